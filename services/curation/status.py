"""`ponyctl status`: per-stage counts from the ledger, failures with their reasons, stages waiting on a service
(parked until it is back), throughput."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

from sqlalchemy import and_, func, or_, select, true

from pony_common.catalog.db import Catalog, catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from services.curation.store import StageRow

STAGES = ("decode", "caption", "score", "style", "safety", "persist")
LEDGER_STATES = ("pending", "running", "waiting", "done", "failed")


@dataclass
class StageStatus:
    stage: str
    pending: int = 0
    running: int = 0
    # Parked on a service or store that is down: retried until it is back, never failed for it.
    waiting: int = 0
    done: int = 0
    failed: int = 0
    # Finished per second between the first start and the last finish of this stage.
    per_second: float = 0.0


@dataclass
class Failure:
    image_id: str
    stage: str
    reason: str
    source: str = ""


@dataclass
class CurationStatus:
    images: dict[str, int] = field(default_factory=dict)
    stages: list[StageStatus] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    retrying: list[Failure] = field(default_factory=list)
    # Images with a stage waiting on a service that is down.
    waiting_images: int = 0
    duplicates: int = 0
    # Images finished per second over the whole run (first stage start to last persist).
    images_per_second: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _rate(count: int, start: dt.datetime | None, end: dt.datetime | None) -> float:
    start, end = _utc(start), _utc(end)
    if not count or start is None or end is None:
        return 0.0
    seconds = (end - start).total_seconds()
    return count / seconds if seconds > 0 else 0.0


def curation_status(catalog: Catalog, *, failures: int = 20) -> CurationStatus:
    """What the curation workflow has done so far, read from the catalog."""
    out = CurationStatus()
    with catalog.session() as s:
        out.images = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
        out.duplicates = s.scalar(select(func.count()).where(ImageRow.is_duplicate == true())) or 0
        # One pass over the ledger: counts, and the first start / last finish of each (stage, status).
        counts: dict[str, dict[str, int]] = {}
        spans: dict[str, tuple[int, dt.datetime | None, dt.datetime | None]] = {}
        first = last = None
        for stage, status, n, started, finished in s.execute(
            select(
                StageRow.stage,
                StageRow.status,
                func.count(),
                func.min(StageRow.started_at),
                func.max(StageRow.finished_at),
            ).group_by(StageRow.stage, StageRow.status)
        ):
            counts.setdefault(stage, {})[status] = n
            if status == "done":
                spans[stage] = (n, started, finished)
            if stage == "caption" and started is not None:
                first = started if first is None else min(first, started)
            if stage == "persist" and finished is not None:
                last = finished if last is None else max(last, finished)
        for stage in [*STAGES, *sorted(set(counts) - set(STAGES))]:
            if stage not in counts:
                continue
            row = StageStatus(stage, **{k: counts[stage].get(k, 0) for k in LEDGER_STATES})
            span = spans.get(stage)
            if span is not None:
                row.per_second = _rate(*span)
            out.stages.append(row)
        failed = s.execute(
            select(StageRow.image_id, StageRow.stage, StageRow.error, ImageRow.source_uri)
            .join(ImageRow, ImageRow.id == StageRow.image_id)
            .where(StageRow.status == "failed")
            .order_by(StageRow.finished_at.desc())
            .limit(failures)
        )
        out.failures = [Failure(r.image_id, r.stage, r.error or "", r.source_uri or "") for r in failed]
        parked = or_(StageRow.status == "waiting", and_(StageRow.status == "pending", StageRow.error.is_not(None)))
        waiting = s.execute(select(StageRow.image_id, StageRow.stage, StageRow.error).where(parked).limit(failures))
        out.retrying = [Failure(r.image_id, r.stage, r.error or "") for r in waiting]
        out.waiting_images = s.scalar(select(func.count(func.distinct(StageRow.image_id))).where(parked)) or 0
        persisted = counts.get("persist", {}).get("done", 0)
        out.images_per_second = _rate(persisted, first, last)
    return out


def format_status(status: CurationStatus) -> str:
    """Plain text for a terminal."""
    lines = ["images: " + (", ".join(f"{k} {v}" for k, v in sorted(status.images.items())) or "none")]
    if status.waiting_images:
        lines.append(f"waiting on a service: {status.waiting_images} images (retried until it is back)")
    if status.duplicates:
        lines.append(f"near-duplicates set aside: {status.duplicates}")
    head = ("stage", "pending", "running", "waiting", "done", "failed", "per s")
    lines.append(f"{head[0]:<8} " + " ".join(f"{h:>8}" for h in head[1:]))
    for r in status.stages:
        counts = " ".join(f"{n:>8}" for n in (r.pending, r.running, r.waiting, r.done, r.failed))
        lines.append(f"{r.stage:<8} {counts} {r.per_second:>8.2f}")
    lines.append(f"throughput: {status.images_per_second:.2f} images/s through the whole workflow")
    if status.retrying:
        lines.append("waiting to retry:")
        lines += [f"  {f.image_id[:12]} {f.stage:<8} {f.reason}" for f in status.retrying]
    if status.failures:
        lines.append("failures:")
        lines += [f"  {f.image_id[:12]} {f.stage:<8} {f.reason}  ({f.source})" for f in status.failures]
    return "\n".join(lines)


def status_for(settings: Settings, failures: int = 20) -> CurationStatus:
    return curation_status(catalog_for(settings.database_url), failures=failures)
