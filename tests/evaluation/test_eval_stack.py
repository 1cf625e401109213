"""A style-adherence evaluation against the real stack on tiny models: the sampler (tritonserver serving the tiny
AuraFlow), the style tagger with a fitted cluster set, the scorer, and the trainer controller's
EvaluateStyleAdherence / GetEvaluation RPCs; the report lands in the catalog and the blob store. Then the promotion
gate: a version that regresses beyond PONY_EVAL_MAX_LOCKING_REGRESSION against the last good one is blocked, and
the catalog row and the run's log say why."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from pony.v1 import style_tagger_pb2, trainer_pb2
from pony_common.blobs import BlobStore, open_uri
from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from pony_common.errors import FailedPrecondition
from pony_common.workers import start_worker, stop_worker
from services.style_tagger.client import StyleTaggerClient
from services.style_tagger.clusters import EmbeddingTable
from services.style_tagger.store import StyleStore
from services.trainer.client import TrainerClient
from services.trainer.evaluation import gate
from services.trainer.evaluation.engine import EvalRequest, Evaluator
from services.trainer.evaluation.report_files import report_file_bytes
from services.trainer.evaluation.results import Report
from services.trainer.evaluation.store import EvaluationStore
from tests.evaluation.judged import FOLLOWED
from tests.sampler_stack import SamplerStack
from tests.style_tagger.synthetic import add_images
from tests.style_tagger.test_service import refs, sample_images

pytestmark = pytest.mark.triton

CONTENTS = ("portrait", "landscape")
SOURCES = ("anime",)
WORDS = ("pixel art",)


@dataclass
class EvalStack:
    settings: Settings  # client side: every address, the token, this module's catalog and blobs
    cluster_set: str


@pytest.fixture(scope="module")
def eval_stack(sampler_stack: SamplerStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EvalStack]:
    """The style tagger (a 4-cluster set fitted on solid-colour images), the scorer and the trainer controller,
    beside the session's sampler; their own catalog and blob store."""
    from services.scorer.app import create_service as create_scorer
    from services.style_tagger.app import create_service as create_style
    from services.trainer.app import create_service as create_trainer

    state = tmp_path_factory.mktemp("eval")
    settings = sampler_stack.settings.replace(
        database_url=f"sqlite:///{state / 'catalog.db'}",
        blob_url=str(state / "blobs"),
        style_k=4,
        eval_seeds=1,
        eval_clusters=2,
    )
    servers = sampler_stack.servers
    started = []
    try:
        style = servers.start(settings, create_style(settings))
        started.append(style)
        settings = settings.replace(style_tagger_addr=f"127.0.0.1:{style.port}")
        scorer = servers.start(settings, create_scorer(settings))
        started.append(scorer)
        settings = settings.replace(scorer_addr=f"127.0.0.1:{scorer.port}")
        trainer = servers.start(settings, create_trainer(settings))
        started.append(trainer)
        settings = settings.replace(trainer_addr=f"127.0.0.1:{trainer.port}")

        images = sample_images(16)
        client = StyleTaggerClient(settings)
        emb = client.embed(style_tagger_pb2.StyleTaggerEmbedRequest(images=refs(images)))
        ids = [r.image_id for r in emb.results]
        vectors = np.array([r.embedding for r in emb.results], dtype=np.float32)
        catalog = catalog_for(settings.database_url)
        add_images(catalog, EmbeddingTable(ids, vectors, [f"artist_{i % 3}" for i in range(16)], ["anime"] * 16))
        StyleStore(catalog).save_embeddings(
            zip(ids, vectors, strict=True), emb.provenance.model, emb.provenance.model_version
        )
        fit = client.fit_clusters(style_tagger_pb2.FitClustersRequest(activate=True, seed=1), timeout=120)
        assert fit.activated and sum(1 for r in fit.reports if r.tag) >= 2
        yield EvalStack(settings, fit.cluster_set_version)
    finally:
        for running in reversed(started):
            servers.stop(running)


@contextmanager
def worker(settings: Settings, name: str) -> Iterator[None]:
    """`ponyctl worker --queues generate` as its own process (the sampler's jobs), stopped whatever happens."""
    proc = start_worker(settings, ["generate"], name=name, log_path=Path(settings.state_dir) / f"{name}.log")
    try:
        yield
    finally:
        stop_worker(proc)


def request_pb(**extra) -> trainer_pb2.EvaluateStyleAdherenceRequest:
    fields = {"model": "pony_v7", "contents": list(CONTENTS), "direct": True, **extra}
    return trainer_pb2.EvaluateStyleAdherenceRequest(**fields)


@pytest.fixture(scope="module")
def evaluated(eval_stack: EvalStack) -> trainer_pb2.EvaluateStyleAdherenceResponse:
    """One evaluation over the trainer controller's RPC: 2 contents x (2 clusters + 4 sources + 4 words) x score
    tags on/off x 1 seed = 80 images of 64 px, 4 steps."""
    client = TrainerClient(eval_stack.settings)
    return client.stub.EvaluateStyleAdherence(request_pb(), timeout=1800)


def test_an_evaluation_over_the_rpc_produces_the_report_and_stores_it(
    eval_stack: EvalStack, evaluated: trainer_pb2.EvaluateStyleAdherenceResponse
) -> None:
    ev = evaluated.evaluation
    assert ev.model == "pony_v7" and ev.version >= 1
    assert ev.images == len(CONTENTS) * (2 + 4 + 4) * 2
    assert 0.0 <= ev.follow_rate <= 1.0 and 0.0 <= ev.locking <= 1.0
    report = Report.from_dict(json.loads(open_uri(ev.json_uri)))
    assert report.evaluation_id == ev.evaluation_id and report.version == ev.version
    assert len(report.cells) == ev.images and len(report.judgements) + report.settings["blocked"] == ev.images
    assert {c.style.kind for c in report.cells} == {"cluster", "source", "word"}
    assert {x.content_id for x in report.locking} == set(CONTENTS)
    for j in report.judgements:
        assert j.requested_cluster is not None and j.followed == (j.assigned_cluster == j.requested_cluster)
        assert -1.0 <= j.content_similarity <= 1.0 and 0.0 <= j.aesthetic_score <= 1.0
        assert Path(j.image_uri).is_file() and j.image_sha256
    whole = report.score_tag_effects[0]
    assert whole.content_id == "" and whole.n_pairs > 0
    assert ev.parquet_uri.endswith(".parquet") and Path(ev.parquet_uri).is_file()
    html = Path(ev.html_uri).read_text()
    assert "<html" in html and "portrait" in html
    # GetEvaluation: by id with the whole report, and the newest of the version.
    client = TrainerClient(eval_stack.settings)
    got = client.stub.GetEvaluation(
        trainer_pb2.GetEvaluationRequest(evaluation_id=ev.evaluation_id, include_report=True)
    )
    assert Report.from_dict(json.loads(got.report_json)) == report
    newest = client.stub.GetEvaluation(trainer_pb2.GetEvaluationRequest(model="pony_v7", version=ev.version))
    assert newest.evaluation.evaluation_id == ev.evaluation_id


SMALL = EvalRequest(model="pony_v7", contents=("portrait",), sources=("anime",), words=(), seeds=1, clusters=2)


def test_the_same_grid_and_seeds_give_the_same_numbers(eval_stack: EvalStack, evaluated) -> None:
    """A small grid twice (6 images each): the same cells, images and figures; and its images are the RPC run's."""
    request = dataclasses.replace(SMALL, direct=True)
    first = Evaluator(eval_stack.settings).run(request).report
    second = Evaluator(eval_stack.settings).run(request).report
    assert [c.cell_id for c in second.cells] == [c.cell_id for c in first.cells] and len(first.cells) == 6

    def figures(report: Report) -> dict:
        return {j.cell_id: (j.image_sha256, j.assigned_cluster, j.followed, round(j.aesthetic_score, 5),
                            round(j.content_similarity, 5)) for j in report.judgements}  # fmt: skip

    assert figures(second) == figures(first)
    assert second.summary.to_dict() == first.summary.to_dict()
    assert second.locking == first.locking and second.aggregates == first.aggregates
    rpc = Report.from_dict(json.loads(open_uri(evaluated.evaluation.json_uri)))
    rpc_images = {j.cell_id: j.image_sha256 for j in rpc.judgements}
    assert all(rpc_images[j.cell_id] == j.image_sha256 for j in first.judgements if j.cell_id in rpc_images)


def test_bad_requests_are_invalid_argument_naming_the_field(eval_stack: EvalStack) -> None:
    client = TrainerClient(eval_stack.settings)
    for request, field in [
        (request_pb(contents=["nope"]), "contents[0]"),
        (request_pb(size=100), "size"),
        (request_pb(adapters=[trainer_pb2.EvalAdapter(name="")]), "adapters[0].name"),
        (request_pb(seeds=999), "seeds"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.EvaluateStyleAdherence(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetEvaluation(trainer_pb2.GetEvaluationRequest(evaluation_id="eval-none"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _store_constructed(settings: Settings, report: Report) -> None:
    store = EvaluationStore(catalog_for(settings.database_url), BlobStore(settings.blob_url))
    store.save(report, report_file_bytes(report))


def test_a_version_regressing_beyond_the_threshold_is_blocked_and_says_why(
    eval_stack: EvalStack, evaluated, sampler_stack: SamplerStack
) -> None:
    """The serving version (its real report from the stack) against a constructed last good version 0 that
    followed every style: its follow rate falls further than the threshold allows."""
    from tests.evaluation.judged import make_report

    settings = eval_stack.settings.replace(eval_after_publish=True, eval_max_locking_regression=0.05)
    good = make_report(None, 0)
    good = Report.from_dict({**good.to_dict(), "evaluation_id": "eval-good-v0", "adapters": []})
    good = Report.from_dict({**good.to_dict(), "summary": {**good.summary.to_dict(), "adapters": []}})
    _store_constructed(settings, good)
    catalog = catalog_for(settings.database_url)
    store = EvaluationStore(catalog, BlobStore(settings.blob_url))
    candidate = store.report(store.get(evaluated.evaluation.evaluation_id))
    assert candidate.summary.follow_rate < 0.95  # tiny random models do not follow most styles

    with pytest.raises(FailedPrecondition) as err:
        gate.check_promotion(store, candidate, 0.05)
    assert "not promoted" in str(err.value) and "follow rate fell" in str(err.value)
    assert "PONY_EVAL_MAX_LOCKING_REGRESSION=0.05" in str(err.value)
    assert gate.check_promotion(store, candidate, 0.0) is None  # the gate off


def test_a_constructed_locking_regression_names_the_content(eval_stack: EvalStack) -> None:
    from tests.evaluation.judged import make_report

    catalog = catalog_for(eval_stack.settings.database_url)
    store = EvaluationStore(catalog, BlobStore(eval_stack.settings.blob_url))
    base = Report.from_dict({**make_report(None, 101).to_dict(), "model": "pony_test", "adapters": [],
                             "evaluation_id": "eval-base-101"})  # fmt: skip
    base = Report.from_dict({**base.to_dict(), "summary": {**base.summary.to_dict(), "model": "pony_test",
                                                           "adapters": []}})  # fmt: skip
    cand = Report.from_dict({**make_report(FOLLOWED, 102).to_dict(), "model": "pony_test", "adapters": [],
                             "evaluation_id": "eval-cand-102"})  # fmt: skip
    store.save(base, report_file_bytes(base))
    with pytest.raises(FailedPrecondition) as err:
        gate.check_promotion(store, cand, 0.2)
    assert "content 'portrait' locks more" in str(err.value) and "follow rate fell" in str(err.value)
    assert gate.check_promotion(store, cand, 0.5) is not None  # within a looser threshold: promoted


def test_the_command_prints_the_cost_and_where_the_report_is_and_names_regressions(
    eval_stack: EvalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ponyctl eval style-adherence --local` on one content (1 x (2 + 4 + 4) x 2 = 20 images), compared with a
    stored version 50 that followed every style: exit 1, the regressions named; the files in --out."""
    from pony_common.cli.main import main
    from tests.evaluation.judged import make_report

    good = make_report(None, 50)
    good = Report.from_dict({**good.to_dict(), "evaluation_id": "eval-good-v50", "adapters": []})
    _store_constructed(eval_stack.settings, good)
    for name, value in eval_stack.settings.to_env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "report"
    argv = ["eval", "style-adherence", "--local", "--direct", "--model", "pony_v7", "--contents", "portrait"]
    code = main([*argv, "--seeds", "1", "--clusters", "2", "--out", str(out), "--compare-to", "50"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "cost: 20 images generated in " in printed
    assert f"report: {out}" in printed
    assert "regression: " in printed and "follow rate fell" in printed
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "judgements.parquet", "aggregates.parquet", "report.html", "comparison.json"} <= names
    report = Report.from_dict(json.loads((out / "report.json").read_text()))
    assert len(report.cells) == 20 and report.summary.model == "pony_v7"


def test_an_evaluation_runs_on_every_family_and_with_a_lora(
    eval_stack: EvalStack, sampler_stack: SamplerStack, tiny_models: Path
) -> None:
    """The small grid on pony_v6 (SDXL), and on pony_v7 with a registered LoRA: the LoRA changes every image, and
    at weight 0 the images are the plain run's."""
    from services.sampler.client import SamplerClient
    from services.trainer.evaluation.results import Adapter
    from tests.sampler.test_adapters import make_lora

    folder = make_lora(tiny_models, tiny_models / "loras_eval" / "style", "pony_v7", seed=31, scale=30.0)
    with SamplerClient(sampler_stack.settings, timeout=120) as sampler:
        sampler.register_adapter("eval-style", str(folder))

    def images(report: Report) -> dict[str, bytes]:
        """Each cell's pixels (the PNGs differ anyway: their parameters name the adapters)."""
        from PIL import Image

        return {j.cell_id: Image.open(j.image_uri).convert("RGB").tobytes() for j in report.judgements}

    run = Evaluator(eval_stack.settings).run
    v6 = run(dataclasses.replace(SMALL, model="pony_v6", direct=True)).report
    assert v6.model == "pony_v6" and len(v6.cells) == 6 and len(images(v6)) == 6
    plain = run(dataclasses.replace(SMALL, direct=True)).report
    lora = run(dataclasses.replace(SMALL, direct=True, adapters=(Adapter("eval-style", 1.0),))).report
    zero = run(dataclasses.replace(SMALL, direct=True, adapters=(Adapter("eval-style", 0.0),))).report
    assert [a.name for a in lora.adapters] == ["eval-style"]
    assert images(plain).keys() == images(lora).keys() == images(zero).keys()
    assert all(images(lora)[cell] != pixels for cell, pixels in images(plain).items())
    assert images(zero) == images(plain)
    assert images(v6) != images(plain)
