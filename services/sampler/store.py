"""The sampler's catalog reads and writes: generation jobs (`generation_jobs`, its own table; every state change is a
conditional write, so a redelivered task, a late cancel or two watchers never disagree about a job's state), the
jobs' event log (`job_events`, its own table: one row per state change or progress step, written in the same
transaction, read back by id as a cursor), and each family's rows of `model_versions` (`name` = the family:
`pony_v7`, `pony_v6`; shared with the trainer), kept in step with that family's Triton repository folders."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from pony_common.catalog import Catalog, upsert
from pony_common.catalog.models import TS, Base, ModelVersionRow, utcnow
from pony_common.errors import InvalidArgument, NotFound, PonyError
from services.sampler.repository import MODEL_NAME, CandidateRepository, ModelRepository

log = logging.getLogger(__name__)

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED, BLOCKED = "succeeded", "failed", "cancelled", "blocked"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, BLOCKED})
# Event kinds besides the states themselves (queued, running and the terminal states name their own events).
PROGRESS, REQUEUED = "progress", "requeued"
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 9


class GenerationJobRow(Base):
    __tablename__ = "generation_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # queued | running | succeeded | failed | cancelled | blocked
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow, onupdate=utcnow)


class JobEventRow(Base):
    """One change of a job, with the job's state, progress and error right after it; ids grow in commit order for
    each job (the event is written after the job row's UPDATE, which holds the row until the commit)."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("generation_jobs.id", ondelete="CASCADE"), index=True)
    # queued | running | progress | requeued | succeeded | failed | cancelled | blocked
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: str
    kind: str
    state: str
    progress_step: int = 0
    progress_total: int = 0
    error: str = ""
    created_at: dt.datetime | None = field(default=None, compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: str
    priority: int
    request: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    progress_step: int = 0
    progress_total: int = 0
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def as_of(self, event: JobEvent) -> JobRecord:
        """The job as it was right after `event` (this record being the job now): the event's state, progress and
        error; the result only from the final event on (nothing changes a job after it)."""
        return replace(
            self,
            state=event.state,
            progress_step=event.progress_step,
            progress_total=event.progress_total,
            error=event.error,
            result=self.result if event.terminal else {},
            updated_at=event.created_at,
        )


def _record(row: GenerationJobRow) -> JobRecord:
    return JobRecord(
        id=row.id,
        state=row.state,
        priority=row.priority,
        request=dict(row.request or {}),
        result=dict(row.result or {}),
        error=row.error or "",
        progress_step=row.progress_step or 0,
        progress_total=row.progress_total or 0,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _event(row: JobEventRow) -> JobEvent:
    return JobEvent(
        id=row.id,
        job_id=row.job_id,
        kind=row.kind,
        state=row.state,
        progress_step=row.progress_step or 0,
        progress_total=row.progress_total or 0,
        error=row.error or "",
        created_at=row.created_at,
    )


def check_job_id(job_id: str) -> str:
    job_id = job_id.strip()
    if not job_id or len(job_id) > 64:
        raise InvalidArgument("job_id", "must be a job id returned by SubmitJob")
    return job_id


class JobStore:
    """Jobs by id: queued -> running -> succeeded | failed | blocked, or cancelled from queued or running. Every
    change that happens (and every progress step) appends its event to `job_events` in the same transaction."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def create(self, request: dict[str, Any], priority: int | None = None) -> JobRecord:
        priority = DEFAULT_PRIORITY if priority is None else priority
        if not 0 <= priority <= MAX_PRIORITY:
            raise InvalidArgument("priority", f"must be in 0..{MAX_PRIORITY}, got {priority}")
        now = dt.datetime.now(dt.UTC)
        row = GenerationJobRow(
            id=uuid.uuid4().hex,
            state=QUEUED,
            priority=priority,
            request=request,
            result={},
            error="",
            progress_step=0,
            progress_total=0,
            created_at=now,
            updated_at=now,
        )
        with self.catalog.session() as s:
            s.add(row)
            s.flush()  # the job before its event (no ORM relationship orders them)
            s.execute(insert(JobEventRow).values(job_id=row.id, kind=QUEUED, state=QUEUED, created_at=now))
            return _record(row)

    def get(self, job_id: str) -> JobRecord:
        with self.catalog.session() as s:
            row = s.get(GenerationJobRow, check_job_id(job_id))
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            return _record(row)

    def events(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events after the cursor `after_id` (0: from the first), oldest first."""
        with self.catalog.session() as s:
            q = (
                select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.id > after_id)
                .order_by(JobEventRow.id)
                .limit(limit)
            )
            return [_event(r) for r in s.scalars(q)]

    def _move(self, job_id: str, from_states: tuple[str, ...], kind: str, **values: Any) -> bool:
        """The conditional UPDATE and, when it changed the job, its event (the job's columns as the UPDATE left
        them), in one transaction."""
        now = dt.datetime.now(dt.UTC)
        values.setdefault("updated_at", now)
        with self.catalog.session() as s:
            moved = s.execute(
                update(GenerationJobRow)
                .where(GenerationJobRow.id == job_id, GenerationJobRow.state.in_(from_states))
                .values(**values)
                .returning(
                    GenerationJobRow.state,
                    GenerationJobRow.progress_step,
                    GenerationJobRow.progress_total,
                    GenerationJobRow.error,
                )
            ).first()
            if moved is None:
                return False
            self._append(s, job_id, kind, *moved, created_at=values["updated_at"])
            return True

    @staticmethod
    def _append(
        s: Session, job_id: str, kind: str, state: str, step: int, total: int, error: str, created_at: dt.datetime
    ) -> None:
        s.execute(
            insert(JobEventRow).values(
                job_id=job_id,
                kind=kind,
                state=state,
                progress_step=step or 0,
                progress_total=total or 0,
                error=error or "",
                created_at=created_at,
            )
        )

    def claim(self, job_id: str) -> bool:
        """queued (or running, for a task redelivered after its worker died) -> running. False: leave it alone."""
        return self._move(job_id, (QUEUED, RUNNING), RUNNING, state=RUNNING, error="")

    def progress(self, job_id: str, step: int, total: int) -> bool:
        """False when the job is no longer running (it was cancelled)."""
        return self._move(job_id, (RUNNING,), PROGRESS, progress_step=step, progress_total=total)

    def finish(self, job_id: str, state: str, result: dict[str, Any] | None = None, error: str = "") -> bool:
        if state not in TERMINAL:
            raise ValueError(f"{state!r} is not a final state")
        return self._move(job_id, (RUNNING,), state, state=state, result=result or {}, error=error)

    def requeue(self, job_id: str, note: str) -> bool:
        """running -> queued while the task waits to retry (the sampler was unavailable)."""
        return self._move(job_id, (RUNNING,), REQUEUED, state=QUEUED, error=note)

    def cancel(self, job_id: str) -> JobRecord:
        """queued/running -> cancelled; a finished job is returned as it is."""
        job_id = check_job_id(job_id)
        self._move(job_id, (QUEUED, RUNNING), CANCELLED, state=CANCELLED, error="cancelled by the caller")
        return self.get(job_id)


class VersionCatalog:
    """Rows of model_versions for one family (`name` = the family, default `pony_v7`): one per repository version
    folder, the served one active."""

    def __init__(self, catalog: Catalog, family: str = MODEL_NAME) -> None:
        self.catalog = catalog
        self.family = family

    def rows(self) -> dict[int, ModelVersionRow]:
        with self.catalog.session() as s:
            found = s.scalars(select(ModelVersionRow).where(ModelVersionRow.name == self.family)).all()
            return {row.version: row for row in found}

    def record(self, version: int, uri: str, source_run_id: str = "", *, active: bool = True) -> None:
        """Upserts the row (a trainer that recorded it first keeps its run id) and makes it the active one."""
        with self.catalog.session() as s:
            values = {"name": self.family, "version": version, "uri": uri, "active": active}
            if source_run_id:
                values["source_run_id"] = source_run_id
            upsert(s, ModelVersionRow, values, keys=["name", "version"])
            if active:
                s.execute(
                    update(ModelVersionRow)
                    .where(ModelVersionRow.name == self.family, ModelVersionRow.version != version)
                    .values(active=False)
                )

    def activate(self, version: int) -> None:
        """`version`'s row becomes the active one (a promoted candidate)."""
        with self.catalog.session() as s:
            s.execute(
                update(ModelVersionRow)
                .where(ModelVersionRow.name == self.family)
                .values(active=ModelVersionRow.version == version)
            )

    def import_published(self, repository: ModelRepository, candidates: CandidateRepository | None = None) -> None:
        """Before the repository is rendered: versions published to the catalog while the sampler was away
        (newer than every folder) become folders with the same numbers; a candidate's rows (loaded or discarded)
        never do."""
        rows = self.rows()
        latest = repository.latest()
        held = set() if candidates is None else {*candidates.discarded(), *(v.version for v in candidates.versions())}
        for version in sorted(v for v in rows if v > latest and v not in held):
            try:
                repository.add_version(rows[version].uri, version=version)
                log.info("catalog version added to the repository", extra={"model": self.family, "version": version})
            except (PonyError, OSError, ValueError) as exc:
                log.error("catalog version %s of %s cannot be served: %s", version, self.family, exc)

    def record_repository(self, repository: ModelRepository) -> None:
        """After rendering: folders the catalog lacks become rows; the newest folder is the active row."""
        rows = self.rows()
        known = {v.version: v.source for v in repository.versions()}
        for version, uri in known.items():
            if version not in rows:
                self.record(version, uri, active=False)
        if known:
            newest = max(known)
            self.record(newest, rows[newest].uri if newest in rows else known[newest], active=True)
