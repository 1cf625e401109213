"""The promotion gate: a version whose style-adherence report regresses beyond PONY_EVAL_MAX_LOCKING_REGRESSION
against the last good version is not promoted (FailedPrecondition naming the regressions); with
PONY_EVAL_AFTER_PUBLISH every published version is evaluated before it serves.

The publish loads the run's checkpoint into the sampler as a candidate (LoadVersion candidate=true: beside the
serving version, reached only by requests pinned to its number), the evaluation runs pinned to it, and then the
candidate is promoted (PromoteVersion: it becomes the serving version) or, when it regressed, discarded
(DiscardVersion): the serving version never changes for a blocked version. The evaluation row, the run's log and
the publish note say why.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Protocol

from pony_common.config import Settings
from pony_common.errors import FailedPrecondition, PonyError
from services.trainer.evaluation import locking
from services.trainer.evaluation.results import Comparison, Report
from services.trainer.evaluation.store import EvaluationStore, StoredEvaluation

if TYPE_CHECKING:
    from services.trainer.evaluation.engine import EvalRequest
    from services.trainer.store import RunStore

log = logging.getLogger(__name__)

REASON_MAX = 4000  # a discard's reason as the sampler takes it (DiscardVersionRequest.reason)


class Candidates(Protocol):
    """The sampler's candidate versions as the gate drives them (publish.py: `SamplerCandidates`, over
    PromoteVersion / DiscardVersion)."""

    def promote(self, name: str, version: int) -> None: ...

    def discard(self, name: str, version: int, reason: str) -> None: ...


def base_evaluation(store: EvaluationStore, model: str, below: int | None) -> StoredEvaluation | None:
    """The newest plain (no adapters), not blocked evaluation of `model` for a version below `below` (None: any):
    the last good version a candidate is compared with."""
    from sqlalchemy import select

    from pony_common.catalog.models import EvaluationRow

    with store.catalog.session() as s:
        query = select(EvaluationRow).where(EvaluationRow.model == model, EvaluationRow.verdict != "blocked")
        if below is not None:
            query = query.where(EvaluationRow.version < below)
        rows = s.scalars(query.order_by(EvaluationRow.version.desc(), EvaluationRow.created_at.desc())).all()
        for row in rows:
            if not row.adapters and row.version is not None:
                return StoredEvaluation.from_row(row)
    return None


def check_promotion(
    store: EvaluationStore, candidate: Report, threshold: float, base_version: int | None = None
) -> Comparison | None:
    """The comparison of `candidate` with the base (version `base_version`'s newest evaluation, else
    `base_evaluation`); FailedPrecondition naming the regressions when any goes beyond `threshold`. None when the
    gate is off (threshold <= 0) or there is nothing to compare with."""
    if threshold <= 0:
        return None
    if base_version is not None:
        base = store.latest(candidate.model, base_version)
    else:
        base = base_evaluation(store, candidate.model, candidate.version)
    if base is None:
        return None
    comparison = locking.compare(store.report(base), candidate, threshold)
    if comparison.regressed:
        raise FailedPrecondition(
            f"{candidate.model} version {candidate.version} not promoted (PONY_EVAL_MAX_LOCKING_REGRESSION="
            f"{threshold:g}): {comparison.reason()}"
        )
    return comparison


def after_publish(
    settings: Settings,
    run_store: RunStore,
    run_id: str,
    name: str,
    version: int,
    candidates: Candidates,
    request: EvalRequest | None = None,
) -> str:
    """Evaluates the candidate `version` of `name` (loaded beside the serving version) pinned to it, gates it
    against the last good version, and promotes it or, when it regressed beyond PONY_EVAL_MAX_LOCKING_REGRESSION,
    discards it. An evaluation that cannot run discards the candidate when the gate is on (threshold > 0: nothing
    unchecked serves) and promotes it when it is off. Returns a note for the publish ("" = promoted, nothing to
    say). `run_store`: services.trainer.store.RunStore (its catalog and the run's log); `request`: the grid
    (default: the default grid of PONY_EVAL_SEEDS x PONY_EVAL_CLUSTERS, as low-priority jobs); its model and
    version are replaced."""
    from services.trainer.evaluation.engine import EvalRequest, Evaluator

    if not settings.eval_after_publish:  # no evaluation asked for: the candidate serves at once
        promoted = _promote(candidates, run_store, name, version)
        run_store.log(run_id, promoted)
        return "" if promoted.startswith("promoted") else promoted
    threshold = settings.eval_max_locking_regression
    evaluator = Evaluator(settings, run_store.catalog)
    request = dataclasses.replace(request or EvalRequest(), model=name, version=version)
    try:
        outcome = evaluator.run(request)
    except Exception as exc:  # an evaluation that fails must not fail the publish; the run's log says why
        if not isinstance(exc, PonyError):
            log.exception("style-adherence evaluation failed", extra={"model": name, "version": version})
        note = f"style-adherence evaluation failed: {type(exc).__name__}: {exc}"
        if threshold > 0:
            note += "; " + _discard(candidates, name, version, note)
        else:
            note += "; " + _promote(candidates, run_store, name, version)
        run_store.log(run_id, note)
        return note
    report = outcome.report
    run_store.log(
        run_id,
        f"style adherence of {name} version {version}: follow rate {report.summary.follow_rate:.3f}, "
        f"locking {report.summary.locking:.3f} ({report.evaluation_id})",
    )
    try:
        check_promotion(evaluator.store, report, threshold, None)
    except FailedPrecondition as exc:
        reason = str(exc)
        evaluator.store.set_verdict(report.evaluation_id, "blocked", reason)
        note = f"promotion blocked: FAILED_PRECONDITION: {reason}; " + _discard(candidates, name, version, reason)
        run_store.log(run_id, note)
        log.warning("promotion blocked", extra={"model": name, "version": version, "reason": reason})
        return note
    promoted = _promote(candidates, run_store, name, version)
    if not promoted.startswith("promoted"):  # the sampler failed it: said in the run's log and the note
        run_store.log(run_id, promoted)
        return promoted
    if threshold > 0:
        evaluator.store.set_verdict(report.evaluation_id, "promoted", "")
    run_store.log(run_id, promoted)
    return ""


def _promote(candidates: Candidates, run_store: RunStore, name: str, version: int) -> str:
    """The candidate becomes the serving version (its catalog row active); a promotion the sampler refuses leaves
    nothing half done: the candidate is discarded, the serving version stays."""
    try:
        candidates.promote(name, version)
    except Exception as exc:  # the note must say what happened, whatever it was
        why = f"promotion of {name} version {version} failed: {exc}"
        return f"{why}; {_discard(candidates, name, version, why)}"
    run_store.activate(name, version)
    return f"promoted {name} version {version}: it serves now"


def _discard(candidates: Candidates, name: str, version: int, reason: str) -> str:
    try:
        candidates.discard(name, version, reason[:REASON_MAX])
    except Exception as exc:
        return f"could not discard candidate {name} version {version}: {exc}"
    return f"candidate {name} version {version} discarded: the serving version is unchanged"
