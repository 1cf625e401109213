"""Protos <-> the evaluation engine for the trainer controller's EvaluateStyleAdherence and GetEvaluation (the
servicer's part; request checks name the field)."""

from __future__ import annotations

import datetime as dt
import json

from google.protobuf.timestamp_pb2 import Timestamp

from pony.v1 import trainer_pb2
from pony_common.blobs import BlobStore, open_uri
from pony_common.catalog import Catalog
from pony_common.config import Settings
from pony_common.errors import InvalidArgument, NotFound
from pony_common.fields import check_id, check_ids
from services.trainer.evaluation.engine import EvalOutcome, EvalRequest
from services.trainer.evaluation.results import Adapter
from services.trainer.evaluation.store import EvaluationStore, StoredEvaluation

MAX_ADAPTERS = 8
MODEL_MAX = 64


def request_from_pb(request: trainer_pb2.EvaluateStyleAdherenceRequest) -> EvalRequest:
    check_id(request.model, "model", MODEL_MAX)
    if len(request.adapters) > MAX_ADAPTERS:
        raise InvalidArgument("adapters", f"at most {MAX_ADAPTERS}, got {len(request.adapters)}")
    adapters = []
    for i, a in enumerate(request.adapters):
        check_id(a.name, f"adapters[{i}].name", MODEL_MAX, required=True)
        adapters.append(Adapter(a.name, float(a.weight) if a.HasField("weight") else 1.0, a.version))
    check_ids(request.contents, "contents", MODEL_MAX)
    eval_request = EvalRequest(
        model=request.model,
        version=request.version,
        adapters=tuple(adapters),
        seeds=request.seeds,
        clusters=request.clusters,
        contents=tuple(request.contents),
        steps=request.steps,
        size=request.size,
        direct=request.direct,
        compare_to_version=request.compare_to_version,
    )
    eval_request.check()
    return eval_request


def _ts(iso: str) -> Timestamp | None:
    if not iso:
        return None
    value = dt.datetime.fromisoformat(iso)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)  # SQLite returns naive datetimes; they are stored in UTC
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def evaluation_to_pb(stored: StoredEvaluation) -> trainer_pb2.Evaluation:
    s = stored.summary
    return trainer_pb2.Evaluation(
        evaluation_id=stored.evaluation_id,
        model=stored.model,
        version=stored.version or 0,
        adapters=[
            trainer_pb2.EvalAdapter(name=a["name"], version=a.get("version", 0), weight=a["weight"])
            for a in stored.adapters
        ],
        created_at=_ts(stored.created_at),
        images=stored.images,
        seconds=stored.seconds,
        follow_rate=float(s.get("follow_rate", 0.0)),
        locking=float(s.get("locking", 0.0)),
        max_locking=float(s.get("max_locking", 0.0)),
        locked_contents=list(s.get("locked_contents", [])),
        score_tag_delta=float(s.get("score_tag_delta", 0.0)),
        json_uri=stored.json_uri,
        parquet_uri=stored.parquet_uri,
        html_uri=stored.html_uri,
    )


def response_to_pb(outcome: EvalOutcome) -> trainer_pb2.EvaluateStyleAdherenceResponse:
    cmp = outcome.comparison
    return trainer_pb2.EvaluateStyleAdherenceResponse(
        evaluation=evaluation_to_pb(outcome.stored),
        regressions=[r.message for r in cmp.regressions] if cmp else [],
        comparison_json=json.dumps(cmp.to_dict(), sort_keys=True) if cmp else "",
    )


def check_get(request: trainer_pb2.GetEvaluationRequest) -> None:
    check_id(request.evaluation_id, "evaluation_id")
    check_id(request.model, "model", MODEL_MAX)
    if not request.evaluation_id and not request.model:
        raise InvalidArgument("evaluation_id", "give an evaluation id, or a model (and version)")


def get_evaluation(
    catalog: Catalog, settings: Settings, request: trainer_pb2.GetEvaluationRequest
) -> trainer_pb2.GetEvaluationResponse:
    store = EvaluationStore(catalog, BlobStore(settings.blob_url))
    if request.evaluation_id:
        stored = store.get(request.evaluation_id)
    else:
        found = store.latest(request.model, request.version or None, plain=False)
        if found is None:
            version = f" version {request.version}" if request.version else ""
            raise NotFound(f"no evaluation of {request.model}{version}")
        stored = found
    report_json = open_uri(stored.json_uri).decode("utf-8") if request.include_report else ""
    return trainer_pb2.GetEvaluationResponse(evaluation=evaluation_to_pb(stored), report_json=report_json)
