"""The curation workflow: caption -> (score, style, safety in parallel) -> persist, one task per step and queue.

Each task takes an image id, reads the image bytes from the blob store, makes one gRPC call and upserts the
result keyed by the image id. The `stages` ledger claims and completes (image, stage), so a redelivered or
resent task (a worker killed mid-task, a lost ack, `ponyctl ingest` run again) does no duplicate effect.
A service that is UNAVAILABLE (or a catalog that cannot be reached) parks the stage: it is `waiting` in the
ledger and retried with capped backoff for as long as the outage lasts, never failed for it. Anything else is
recorded as the stage's failure with its reason, and the workflow goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from celery import Task, chain, chord
from celery.canvas import Signature
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from pony.v1 import (
    captioner_pb2,
    common_pb2,
    safety_pb2,
    scorer_pb2,
    style_tagger_pb2,
)
from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, catalog_for, upsert
from pony_common.catalog.models import (
    AestheticScoreRow,
    CaptionRow,
    EmbeddingRow,
    ImageRow,
    SafetyDecisionRow,
    StyleAssignmentRow,
)
from pony_common.celery_app import current_settings, is_retryable, pony_task
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable
from services.captioner.client import CaptionerClient
from services.curation.duplicates import resolve_duplicates
from services.curation.rpc import ItemFailed, call, only_result
from services.curation.store import StageRow, claim_stage, complete_stage, fail_stage
from services.safety.client import SafetyClient
from services.scorer.client import ScorerClient
from services.style_tagger.client import StyleTaggerClient

log = logging.getLogger(__name__)

STAGES = ("caption", "score", "style", "safety", "persist")
PARALLEL_STAGES = ("score", "style", "safety")
TASK_NAMES = {stage: f"pony.curation.{stage}" for stage in STAGES}


FINAL = ("done", "failed")


class StageWaiting(DependencyUnavailable):
    """Persist ran before all parallel stages finished (a redelivered chord part): retried with backoff."""


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """`RATING_SAFE` -> `safe` (empty for the UNSPECIFIED value)."""
    name = enum.Name(value)
    return "" if name.endswith("_UNSPECIFIED") else name.removeprefix(prefix).lower()


def caption_kind(value: int) -> str:
    return enum_name(captioner_pb2.CaptionKind, value, "CAPTION_KIND_")


def _image(catalog: Catalog, image_id: str) -> ImageRow:
    with catalog.session() as s:
        row = s.get(ImageRow, image_id)
    if row is None:
        raise ItemFailed("not_found", f"image {image_id} is not in the catalog")
    return row


def image_ref(settings: Settings, row: ImageRow) -> common_pb2.ImageRef:
    """The image as ImageRef bytes, read from the blob store."""
    try:
        data = BlobStore(settings.blob_url).get(row.blob_key)
    except FileNotFoundError:
        raise ItemFailed("missing_blob", f"blob {row.blob_key} is missing") from None
    return common_pb2.ImageRef(data=data, image_id=row.id)


def _mark_waiting(catalog: Catalog, image_id: str, stage: str, note: str) -> None:
    """Shows a parked stage in the ledger (`waiting` + its reason); the retry's claim clears it."""
    with catalog.session() as s:
        s.execute(
            update(StageRow)
            .where(StageRow.image_id == image_id, StageRow.stage == stage, StageRow.status == "running")
            .values(status="waiting", error=note)
        )


def run_stage(task: Task, image_id: str, stage: str, work: Callable[[Settings, Catalog, ImageRow], None]) -> dict:
    """Claim (skip when done already), do the work, complete; a permanent error is the stage's failure.

    A service that is UNAVAILABLE and a catalog database that cannot be reached park the stage (`waiting`) and
    are retried with capped backoff, for as long as the outage lasts when the task parks (every curation task).
    Persist is the join: it is worked out again whenever the image is not final yet (an image sent through the
    workflow again after a failure), since its effect is a function of the ledger."""
    settings = current_settings()
    catalog: Catalog | None = None
    try:
        catalog = catalog_for(settings.database_url)
        if not claim_stage(catalog, image_id, stage):
            row = _image(catalog, image_id) if stage == "persist" else None
            if row is None or row.status in FINAL:
                log.info("stage already done", extra={"image_id": image_id, "stage": stage})
                return {"image_id": image_id, "stage": stage, "status": "done", "skipped": True}
            work(settings, catalog, row)
            return {"image_id": image_id, "stage": stage, "status": "done", "rejoined": True}
        work(settings, catalog, _image(catalog, image_id))
        complete_stage(catalog, image_id, stage)
        return {"image_id": image_id, "stage": stage, "status": "done"}
    except Exception as exc:
        database_down = isinstance(exc, OperationalError)
        if catalog is None and not database_down:
            raise
        retries_left = task.max_retries is None or task.request.retries < task.max_retries
        if (is_retryable(exc) or database_down) and retries_left and not task.request.called_directly:
            note = f"retry {task.request.retries + 1}: {_reason(exc)}"
            if database_down:
                raise DependencyUnavailable(f"catalog database unavailable: {exc}") from exc
            if catalog is not None:
                _mark_waiting(catalog, image_id, stage, note)
            raise
        reason = _reason(exc)
        if catalog is None:
            raise
        fail_stage(catalog, image_id, stage, reason)
        if stage == "persist":
            with catalog.session() as s:
                s.execute(update(ImageRow).where(ImageRow.id == image_id).values(status="failed", error=reason))
        log.warning("stage failed", extra={"image_id": image_id, "stage": stage, "error": reason})
        return {"image_id": image_id, "stage": stage, "status": "failed", "error": reason}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ItemFailed):
        return str(exc)
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return f"{code().name.lower()}: {exc.details()}"  # type: ignore[attr-defined]
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"


# --- the steps -------------------------------------------------------------------------------------------


def caption_image(settings: Settings, catalog: Catalog, row: ImageRow) -> None:
    item = captioner_pb2.CaptionItem(
        image=image_ref(settings, row),
        tags=row.tags or [],
        characters=row.characters or [],
        artists=[row.artist] if row.artist else [],
        item_id=row.id,
    )
    resp = call(CaptionerClient(settings).caption, captioner_pb2.CaptionRequest(items=[item]))
    result = only_result(resp.results)
    rows = [
        {
            "image_id": row.id,
            "kind": caption_kind(c.kind),
            "text": c.text,
            "model": c.provenance.model,
            "model_version": c.provenance.model_version,
            "template_version": c.provenance.component_version,
        }
        for c in result.captions
        if caption_kind(c.kind)
    ]
    if not rows:
        raise ItemFailed("no_captions", "the captioner returned no captions")
    with catalog.session() as s:
        upsert(s, CaptionRow, rows, keys=("image_id", "kind"))


def score_image(settings: Settings, catalog: Catalog, row: ImageRow) -> None:
    resp = call(ScorerClient(settings).score, scorer_pb2.ScoreRequest(images=[image_ref(settings, row)]))
    r = only_result(resp.results)
    with catalog.session() as s:
        upsert(
            s,
            AestheticScoreRow,
            {
                "image_id": row.id,
                "raw": r.raw,
                "score": r.score,
                "score_tag": r.score_tag,
                "model": r.provenance.model,
                "model_version": r.provenance.model_version,
                "head_version": r.provenance.component_version,
            },
            keys=("image_id",),
        )


def save_style_tags(catalog: Catalog, tags: list[Any]) -> int:
    """Upserts StyleTag results as style assignments (keyed by image and cluster set version)."""
    rows = [
        {
            "image_id": t.image_id,
            "cluster_set_version": t.cluster_set_version,
            "cluster_id": t.cluster_id,
            "tag": t.tag,
            "distance": t.distance,
            "palette_tags": list(t.palette_tags),
        }
        for t in tags
    ]
    if rows:
        with catalog.session() as s:
            upsert(s, StyleAssignmentRow, rows, keys=("image_id", "cluster_set_version"))
    return len(rows)


def save_style_embedding(catalog: Catalog, image_id: str, values: Any, provenance: Any) -> None:
    """Upserts an image's style embedding (kind `style`; FitClusters clusters these)."""
    with catalog.session() as s:
        upsert(
            s,
            EmbeddingRow,
            {
                "image_id": image_id,
                "kind": "style",
                "dim": len(values),
                "vector": np.asarray(values, dtype="<f4").tobytes(),
                "model": provenance.model,
                "model_version": provenance.model_version,
            },
            keys=("image_id", "kind"),
        )


def style_image(settings: Settings, catalog: Catalog, row: ImageRow) -> None:
    """Tags the image with the active style cluster set and stores its style embedding; before any set
    exists, stores only the embedding (clustering then tags the pool: `services.curation.styles`)."""
    ref = image_ref(settings, row)
    client = StyleTaggerClient(settings)
    try:
        resp = call(client.tag, style_tagger_pb2.TagRequest(images=[ref], include_embedding=True))
    except ItemFailed as exc:
        if exc.reason != "failed_precondition":
            raise
        emb = call(client.embed, style_tagger_pb2.StyleTaggerEmbedRequest(images=[ref]))
        save_style_embedding(catalog, row.id, only_result(emb.results).embedding, emb.provenance)
        return
    tag = only_result(resp.results)
    if tag.embedding:
        save_style_embedding(catalog, row.id, tag.embedding, resp.provenance)
    save_style_tags(catalog, [_with_id(tag, row.id)])


def _with_id(tag: Any, image_id: str) -> Any:
    if not tag.image_id:
        tag.image_id = image_id
    return tag


def safety_image(settings: Settings, catalog: Catalog, row: ImageRow) -> None:
    with catalog.session() as s:
        caption = s.query(CaptionRow.text).filter_by(image_id=row.id, kind="medium").scalar()
    item = safety_pb2.SafetyItem(
        image=image_ref(settings, row),
        caption=caption or "",
        tags=row.tags or [],
        characters=row.characters or [],
        item_id=row.id,
    )
    resp = call(SafetyClient(settings).check, safety_pb2.CheckRequest(items=[item]))
    r = only_result(resp.results)
    decision = enum_name(safety_pb2.Decision, r.decision, "DECISION_")
    if not decision:
        raise ItemFailed("no_decision", "the safety service returned no decision")
    with catalog.session() as s:
        upsert(
            s,
            SafetyDecisionRow,
            {
                "image_id": row.id,
                "rating": enum_name(common_pb2.Rating, r.rating, "RATING_") or "unknown",
                "decision": decision,
                "reasons": [{"rule_id": x.rule_id, "message": x.message} for x in r.reasons],
                "flags": list(r.flags),
                "unknown_characters": list(r.unknown_characters),
                "codex_version": int(r.codex_version) if r.codex_version.isdigit() else 0,
                "model": r.provenance.model,
                "model_version": r.provenance.model_version,
            },
            keys=("image_id",),
        )


def persist_image(settings: Settings, catalog: Catalog, row: ImageRow) -> None:
    """Joins the parallel steps: the image is `done`, or `failed` with every failed stage's reason."""
    with catalog.session() as s:
        stages = {r.stage: r for r in s.query(StageRow).filter(StageRow.image_id == row.id)}
    unfinished = [
        st for st in ("caption", *PARALLEL_STAGES) if st not in stages or stages[st].status not in ("done", "failed")
    ]
    if unfinished:
        raise StageWaiting(f"waiting for {', '.join(unfinished)}")
    failures = [f"{st}: {stages[st].error}" for st in ("caption", *PARALLEL_STAGES) if stages[st].status == "failed"]
    with catalog.session() as s:
        s.execute(
            update(ImageRow)
            .where(ImageRow.id == row.id)
            .values(status="failed" if failures else "done", error="; ".join(failures) or None)
        )
    if row.dup_group:
        resolve_duplicates(catalog, row.dup_group)


# --- the tasks ---------------------------------------------------------------------------------------------


@pony_task(TASK_NAMES["caption"], queue="caption", parks=True)
def caption(self: Task, image_id: str) -> dict:
    """Captions of every kind, guided by the image's tags and characters."""
    return run_stage(self, image_id, "caption", caption_image)


@pony_task(TASK_NAMES["score"], queue="score", parks=True)
def score(self: Task, image_id: str) -> dict:
    """Aesthetic score and its score tag."""
    return run_stage(self, image_id, "score", score_image)


@pony_task(TASK_NAMES["style"], queue="style", parks=True)
def style(self: Task, image_id: str) -> dict:
    """Style cluster tag and palette tags (or the style embedding before a cluster set exists)."""
    return run_stage(self, image_id, "style", style_image)


@pony_task(TASK_NAMES["safety"], queue="safety", parks=True)
def safety(self: Task, image_id: str) -> dict:
    """Rating and block decision from image, caption, tags and characters."""
    return run_stage(self, image_id, "safety", safety_image)


@pony_task(TASK_NAMES["persist"], queue="persist", parks=True)
def persist(self: Task, image_id: str, *_parts: Any) -> dict:
    """Final status of the image once caption, score, style and safety have finished."""
    return run_stage(self, image_id, "persist", persist_image)


def workflow(image_id: str) -> Signature:
    """caption -> chord(score, style, safety) -> persist, every signature immutable (ids, not results)."""
    return chain(
        caption.si(image_id),
        chord([score.si(image_id), style.si(image_id), safety.si(image_id)], persist.si(image_id)),
    )
