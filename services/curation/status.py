"""`ponyctl status`: per-stage counts of the ledger (kept by the database, not counted per call), failures with
their reasons, stages waiting on a service (parked until it is back), throughput."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

from sqlalchemy import and_, func, or_, select, text, true, union_all
from sqlalchemy.orm import Session

from pony_common.catalog.db import Catalog, catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from services.curation.store import StageCountRow, StageRow

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


# PostgreSQL: the triggers add a delta row per ledger statement and key; `status` sums them and folds them back into
# one row per key once there are more than this many.
COMPACT_AFTER = 1000


def stage_counts(session: Session) -> dict[str, dict[str, int]]:
    """Ledger rows per stage and status, from the counts the database keeps (`stage_counts`, migration 0006): a few
    rows read whatever the size of the ledger."""
    c = StageCountRow.__table__.c
    counts: dict[str, dict[str, int]] = {}
    rows = 0
    for stage, status, n, parts in session.execute(
        select(c.stage, c.status, func.sum(c.n), func.count()).group_by(c.stage, c.status)
    ):
        rows += parts
        if n:
            counts.setdefault(stage, {})[status] = int(n)
    if rows > COMPACT_AFTER and session.get_bind().dialect.name == "postgresql":
        _compact(session)
    return counts


def _compact(session: Session) -> None:
    """Folds the delta rows into one row per key, in one statement. Concurrent writers only add rows (not seen by
    this statement's snapshot, so kept), and a concurrent compaction skips the rows this one deleted: sums stay."""
    session.execute(
        text(
            "WITH gone AS (DELETE FROM stage_counts RETURNING stage, status, n) "
            "INSERT INTO stage_counts (stage, status, n) "
            "SELECT stage, status, sum(n) FROM gone GROUP BY stage, status HAVING sum(n) <> 0"
        )
    )


def _spans(
    session: Session, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], tuple[dt.datetime | None, dt.datetime | None]]:
    """First start and last finish of the ledger rows of each (stage, status), in one statement of index lookups
    (ix_stages_stage_status_started / _finished)."""
    if not keys:
        return {}
    columns = []
    for stage, status in keys:
        key = (StageRow.stage == stage, StageRow.status == status)
        columns.append(select(func.min(StageRow.started_at)).where(*key).scalar_subquery())
        columns.append(select(func.max(StageRow.finished_at)).where(*key).scalar_subquery())
    values = session.execute(select(*columns)).one()
    return {key: (values[2 * i], values[2 * i + 1]) for i, key in enumerate(keys)}


def _failures(session: Session, stages: list[str], limit: int) -> list[Failure]:
    """The `limit` latest failures: the latest of each stage with failures (ix_stages_stage_status_finished, read
    backwards), then the latest of those; each with its image's source."""
    if not stages or limit < 1:
        return []
    parts = [
        select(
            select(StageRow.image_id, StageRow.stage, StageRow.error, StageRow.finished_at)
            .where(StageRow.stage == stage, StageRow.status == "failed")
            .order_by(StageRow.finished_at.desc())
            .limit(limit)
            .subquery()
        )
        for stage in stages
    ]
    latest = (parts[0] if len(parts) == 1 else union_all(*parts)).subquery()
    rows = session.execute(
        select(latest.c.image_id, latest.c.stage, latest.c.error, ImageRow.source_uri)
        .join(ImageRow, ImageRow.id == latest.c.image_id)
        .order_by(latest.c.finished_at.desc())
        .limit(limit)
    )
    return [Failure(r.image_id, r.stage, r.error or "", r.source_uri or "") for r in rows]


def curation_status(catalog: Catalog, *, failures: int = 20) -> CurationStatus:
    """What the curation workflow has done so far, read from the catalog: the ledger's counts from `stage_counts`,
    its spans, failures and retries through indexes (no pass over the ledger)."""
    out = CurationStatus()
    with catalog.session() as s:
        out.images = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
        out.duplicates = s.scalar(select(func.count()).where(ImageRow.is_duplicate == true())) or 0
        counts = stage_counts(s)
        keys = [(stage, status) for stage, by_status in counts.items() for status in by_status]
        spans = _spans(s, keys)
        first = min((v[0] for (st, _), v in spans.items() if st == "caption" and v[0] is not None), default=None)
        last = max((v[1] for (st, _), v in spans.items() if st == "persist" and v[1] is not None), default=None)
        for stage in [*STAGES, *sorted(set(counts) - set(STAGES))]:
            if stage not in counts:
                continue
            row = StageStatus(stage, **{k: counts[stage].get(k, 0) for k in LEDGER_STATES})
            if "done" in counts[stage]:
                row.per_second = _rate(counts[stage]["done"], *spans[(stage, "done")])
            out.stages.append(row)
        out.failures = _failures(s, [st for st, by_status in counts.items() if by_status.get("failed")], failures)
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
