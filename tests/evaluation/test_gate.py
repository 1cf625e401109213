"""The promotion gate. Without the model stack: off unless PONY_EVAL_AFTER_PUBLISH (the candidate is promoted at
once); an evaluation that cannot run leaves a note in the run's log instead of failing the publish, and a gate that
is on discards the candidate rather than serve it unchecked. Against the real stack (tritonserver on the tiny
AuraFlow, style tagger, scorer): a candidate that regresses beyond PONY_EVAL_MAX_LOCKING_REGRESSION is evaluated
pinned to its version, discarded and never served, and the evaluation row, the run's log and the note say why; one
that passes is promoted and serves."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from pony_common.blobs import BlobStore
from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from services.sampler.client import SamplerClient
from services.trainer.evaluation import gate
from services.trainer.evaluation.results import Report
from services.trainer.evaluation.store import EvaluationStore
from services.trainer.publish import SamplerCandidates, publish_run
from services.trainer.store import RunStore
from tests.conftest import free_port
from tests.evaluation.test_eval_stack import SMALL, EvalStack, _store_constructed, eval_stack, worker  # noqa: F401
from tests.sampler.test_candidates import other_weights
from tests.sampler_stack import SamplerStack

FAMILY = "pony_v7"


@dataclass
class Recorded:
    """The gate's `Candidates` without a sampler: what it was told to do."""

    calls: list[tuple[str, str, int, str]] = field(default_factory=list)

    def promote(self, name: str, version: int) -> None:
        self.calls.append(("promote", name, version, ""))

    def discard(self, name: str, version: int, reason: str) -> None:
        self.calls.append(("discard", name, version, reason))


def _runs(settings: Settings, run_id: str = "r1") -> RunStore:
    runs = RunStore(catalog_for(settings.database_url))
    runs.create(run_id, run_id, {}, "local", "", "")
    return runs


def test_with_the_gate_off_the_candidate_is_promoted_at_once(tmp_path: Path) -> None:
    settings = Settings.from_env({}, state_dir=str(tmp_path))
    runs = _runs(settings)
    runs.publish("r1", FAMILY, "/models/v2", version=2, active=False)
    candidates = Recorded()
    assert gate.after_publish(settings, runs, "r1", FAMILY, 2, candidates) == ""
    assert candidates.calls == [("promote", FAMILY, 2, "")]
    assert [e.message for e in runs.events("r1")][-1] == f"promoted {FAMILY} version 2: it serves now"


def test_an_evaluation_that_cannot_run_is_noted_not_raised_and_the_candidate_not_served(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = Settings.from_env({}, state_dir=str(tmp_path)).replace(
        eval_after_publish=True,
        eval_max_locking_regression=0.1,
        style_tagger_addr=dead,
        scorer_addr=dead,
        sampler_addr=dead,
        rpc_retries=2,
        rpc_timeout_s=5.0,
    )
    runs = _runs(settings)
    candidates = Recorded()
    note = gate.after_publish(settings, runs, "r1", FAMILY, 2, candidates)
    assert note.startswith("style-adherence evaluation failed: ") and "style tagger" in note
    assert note.endswith(f"candidate {FAMILY} version 2 discarded: the serving version is unchanged")
    assert [(c[0], c[2]) for c in candidates.calls] == [("discard", 2)]
    assert candidates.calls[0][3].startswith("style-adherence evaluation failed: ")
    assert [e.message for e in runs.events("r1")][-1] == note
    # With the gate off (threshold 0) an evaluation that cannot run does not hold the version back.
    candidates = Recorded()
    note = gate.after_publish(settings.replace(eval_max_locking_regression=0.0), runs, "r1", FAMILY, 3, candidates)
    assert note.startswith("style-adherence evaluation failed: ") and note.endswith("it serves now")
    assert candidates.calls == [("promote", FAMILY, 3, "")]


def _serving(client: SamplerClient) -> int:
    (active,) = [v.version for v in client.list_versions(model=FAMILY) if v.active]
    return active


def _good_baseline(settings: Settings, evaluation_id: str) -> None:
    """A constructed evaluation of version 0 in which every style was followed: the last good version."""
    from tests.evaluation.judged import make_report

    good = make_report(None, 0)
    good = Report.from_dict({**good.to_dict(), "evaluation_id": evaluation_id, "adapters": []})
    good = Report.from_dict({**good.to_dict(), "summary": {**good.summary.to_dict(), "adapters": []}})
    _store_constructed(settings, good)


@pytest.mark.triton
def test_a_regressing_candidate_is_discarded_never_served_and_says_why(
    eval_stack: EvalStack,  # noqa: F811
    sampler_stack: SamplerStack,
) -> None:
    settings = eval_stack.settings.replace(eval_after_publish=True, eval_max_locking_regression=0.05)
    _good_baseline(settings, "eval-good-before-blocked")
    runs = _runs(settings, "gate-blocked")
    client = SamplerClient(sampler_stack.settings, timeout=120)
    serving = _serving(client)
    checkpoint = other_weights(sampler_stack, "gate-candidate")
    cand = client.load_version(str(checkpoint), "gate-blocked", model=FAMILY, candidate=True, timeout=300)
    try:  # the grid as low-priority jobs (as a publish runs it): the worker's GenerateStream calls pin the candidate
        with worker(sampler_stack.settings, "gate-generate-worker"):
            note = gate.after_publish(
                settings, runs, "gate-blocked", FAMILY, cand.version, SamplerCandidates(settings), SMALL
            )
    finally:
        if any(v.candidate for v in client.list_versions(model=FAMILY)):
            client.discard_version(cand.version, model=FAMILY, reason="test cleanup")
    assert note.startswith(f"promotion blocked: FAILED_PRECONDITION: {FAMILY} version {cand.version} not promoted")
    assert "follow rate fell" in note and "PONY_EVAL_MAX_LOCKING_REGRESSION=0.05" in note
    assert note.endswith(f"candidate {FAMILY} version {cand.version} discarded: the serving version is unchanged")
    # The evaluation ran on the candidate (pinned), its row says blocked and why; the run's log says it too.
    store = EvaluationStore(catalog_for(settings.database_url), BlobStore(settings.blob_url))
    blocked = store.latest(FAMILY, cand.version)
    assert blocked is not None and blocked.verdict == "blocked" and "follow rate fell" in blocked.reason
    jobs_report = store.report(blocked)
    assert jobs_report.version == cand.version and jobs_report.settings["generation"] == "jobs (priority 0)"
    assert len(jobs_report.cells) == 6
    assert any(e.message == note for e in runs.events("gate-blocked"))
    # Never served: the serving version did not change, the candidate is gone and its number not reused.
    assert _serving(client) == serving
    assert client.generate("a pony", seed=1, steps=1).provenance.model_version == str(serving)
    assert not any(v.candidate or v.version == cand.version for v in client.list_versions(model=FAMILY))
    assert "follow rate fell" in sampler_stack.model.candidates[FAMILY].discarded()[cand.version]
    with pytest.raises(grpc.RpcError) as err:
        client.generate("a pony", seed=1, steps=1, model_version=cand.version)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.triton
def test_a_publish_within_the_threshold_is_a_candidate_first_then_promoted_and_serves(
    eval_stack: EvalStack,  # noqa: F811
    sampler_stack: SamplerStack,
) -> None:
    """publish_run with the gate on: LoadVersion(candidate) -> the evaluation pinned to it -> PromoteVersion."""
    # A threshold no rate can exceed: the comparison runs, nothing regresses beyond it.
    settings = eval_stack.settings.replace(eval_after_publish=True, eval_max_locking_regression=1.0)
    _good_baseline(settings, "eval-good-before-passed")
    runs = _runs(settings, "gate-passed")
    client = SamplerClient(sampler_stack.settings, timeout=120)
    (active,) = [v for v in client.list_versions(model=FAMILY) if v.active]
    expected = sampler_stack.model.next_version(FAMILY)
    try:
        # The serving version's own pipeline as the run's checkpoint: other tests keep the weights they expect.
        grid = dataclasses.replace(SMALL, direct=True)
        published = publish_run(settings, runs, "gate-passed", active.uri, evaluation=grid)
    finally:
        for v in client.list_versions(model=FAMILY):
            if v.candidate:
                client.discard_version(v.version, model=FAMILY, reason="test cleanup")
    assert published.version == expected and published.loaded_by_sampler and published.note == ""
    assert _serving(client) == expected
    assert client.generate("a pony", seed=1, steps=1).provenance.model_version == str(expected)
    store = EvaluationStore(catalog_for(settings.database_url), BlobStore(settings.blob_url))
    evaluated = store.latest(FAMILY, expected)
    assert evaluated is not None and evaluated.verdict == "promoted"
    assert store.report(evaluated).version == expected
    messages = [e.message for e in runs.events("gate-passed")]
    assert f"sampler loaded {FAMILY} version {expected} as a candidate (not serving)" in messages
    assert messages[-1] == f"promoted {FAMILY} version {expected}: it serves now"
    assert runs.get("gate-passed").model_version == expected


def test_with_the_gate_on_a_publish_without_a_sampler_is_not_recorded_to_serve_later(tmp_path: Path) -> None:
    """A catalog row would become a serving folder at the next sampler start, never evaluated: none is written."""
    from sqlalchemy import select

    from pony_common.catalog.models import ModelVersionRow

    settings = Settings.from_env({}, state_dir=str(tmp_path)).replace(
        eval_after_publish=True, sampler_addr=f"127.0.0.1:{free_port()}"
    )
    runs = _runs(settings)
    published = publish_run(settings, runs, "r1", str(tmp_path / "final"))
    assert not published.loaded_by_sampler and published.version == 0
    assert published.note.endswith("not published (PONY_EVAL_AFTER_PUBLISH evaluates a candidate in the sampler first)")
    with runs.catalog.session() as s:
        assert s.scalars(select(ModelVersionRow)).all() == []
    assert runs.get("r1").model_version is None  # a later publish of the run tries again
