"""The trainer's catalog: its tables (`training_runs`, `run_events`), the run state machine (conditional writes),
loss/log events, and the published `model_versions` rows (a table shared with the sampler)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from pony_common.catalog import Catalog
from pony_common.catalog.models import TS, Base, ModelVersionRow, utcnow
from pony_common.errors import NotFound

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "Pending", "Running", "Succeeded", "Failed", "Cancelled"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = (PENDING, RUNNING)


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    executor: Mapped[str] = mapped_column(String(16))
    # Pending | Running | Succeeded | Failed | Cancelled
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    namespace: Mapped[str] = mapped_column(String(64), default="")
    job_name: Mapped[str] = mapped_column(String(128), default="")
    step: Mapped[int] = mapped_column(Integer, default=0)
    last_loss: Mapped[float | None] = mapped_column(Float)
    checkpoint_uri: Mapped[str] = mapped_column(Text, default="")
    model_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow, onupdate=utcnow)


class RunEventRow(Base):
    __tablename__ = "run_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    # state | loss | log
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="")
    step: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


@dataclass(frozen=True)
class Run:
    id: str
    name: str
    spec: dict[str, Any]
    executor: str
    state: str
    reason: str = ""
    namespace: str = ""
    job_name: str = ""
    step: int = 0
    last_loss: float | None = None
    checkpoint_uri: str = ""
    model_version: int | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def total_steps(self) -> int:
        return sum(int(s.get("steps", 0)) for s in self.spec.get("stages", []))


@dataclass(frozen=True)
class RunEvent:
    id: int
    run_id: str
    kind: str  # state | loss | log
    state: str = ""
    step: int = 0
    loss: float | None = None
    message: str = ""
    created_at: dt.datetime | None = field(default=None, compare=False)


def _run(row: TrainingRunRow) -> Run:
    return Run(
        id=row.id,
        name=row.name,
        spec=dict(row.spec or {}),
        executor=row.executor,
        state=row.state,
        reason=row.reason or "",
        namespace=row.namespace or "",
        job_name=row.job_name or "",
        step=row.step or 0,
        last_loss=row.last_loss,
        checkpoint_uri=row.checkpoint_uri or "",
        model_version=row.model_version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _event(row: RunEventRow) -> RunEvent:
    return RunEvent(row.id, row.run_id, row.kind, row.state, row.step, row.loss, row.message, row.created_at)


class RunStore:
    """All catalog reads and writes of the trainer. State changes are conditional UPDATEs, so two writers
    (a watch event and a resync, or two controller replicas) cannot both move a run out of a state."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def create(self, run_id: str, name: str, spec: dict[str, Any], executor: str, namespace: str, job_name: str) -> Run:
        with self.catalog.session() as s:
            row = TrainingRunRow(
                id=run_id,
                name=name,
                spec=spec,
                executor=executor,
                state=PENDING,
                reason="submitted",
                namespace=namespace,
                job_name=job_name,
            )
            s.add(row)
            s.flush()  # the row before its event (no ORM relationship orders them)
            s.add(RunEventRow(run_id=run_id, kind="state", state=PENDING, message="submitted"))
            return _run(row)

    def find(self, run_id: str) -> Run | None:
        with self.catalog.session() as s:
            row = s.get(TrainingRunRow, run_id)
            return _run(row) if row is not None else None

    def get(self, run_id: str) -> Run:
        run = self.find(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return run

    def list(self, states: tuple[str, ...] = (), executor: str = "", limit: int = 100, offset: int = 0) -> list[Run]:
        with self.catalog.session() as s:
            q = select(TrainingRunRow).order_by(TrainingRunRow.created_at.desc(), TrainingRunRow.id)
            if states:
                q = q.where(TrainingRunRow.state.in_(states))
            if executor:
                q = q.where(TrainingRunRow.executor == executor)
            return [_run(r) for r in s.scalars(q.limit(limit).offset(offset))]

    def transition(self, run_id: str, state: str, reason: str = "") -> bool:
        """Moves a non-terminal run to `state`; False when it is terminal already or in that state."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        with self.catalog.session() as s:
            changed = s.execute(
                update(TrainingRunRow)
                .where(TrainingRunRow.id == run_id)
                .where(TrainingRunRow.state.in_(ACTIVE))
                .where(TrainingRunRow.state != state)
                .values(state=state, reason=reason, updated_at=dt.datetime.now(dt.UTC))
            ).rowcount
            if changed:
                s.add(RunEventRow(run_id=run_id, kind="state", state=state, message=reason))
            return bool(changed)

    def record_loss(self, run_id: str, step: int, loss: float) -> bool:
        """Stores a loss event once per step (a re-read log or a resumed run does not duplicate it)."""
        with self.catalog.session() as s:
            seen = s.scalar(
                select(func.count())
                .select_from(RunEventRow)
                .where(RunEventRow.run_id == run_id, RunEventRow.kind == "loss", RunEventRow.step == step)
            )
            if seen:
                return False
            s.add(RunEventRow(run_id=run_id, kind="loss", step=step, loss=loss))
            s.execute(
                update(TrainingRunRow)
                .where(TrainingRunRow.id == run_id, TrainingRunRow.step <= step)
                .values(step=step, last_loss=loss, updated_at=dt.datetime.now(dt.UTC))
            )
            return True

    def log(self, run_id: str, message: str, step: int = 0) -> None:
        with self.catalog.session() as s:
            s.add(RunEventRow(run_id=run_id, kind="log", step=step, message=message[:4000]))

    def set_checkpoint(self, run_id: str, uri: str) -> None:
        with self.catalog.session() as s:
            s.execute(update(TrainingRunRow).where(TrainingRunRow.id == run_id).values(checkpoint_uri=uri))

    def events(self, run_id: str, after_id: int = 0, limit: int = 1000) -> list[RunEvent]:
        with self.catalog.session() as s:
            q = (
                select(RunEventRow)
                .where(RunEventRow.run_id == run_id, RunEventRow.id > after_id)
                .order_by(RunEventRow.id)
                .limit(limit)
            )
            return [_event(r) for r in s.scalars(q)]

    def publish(self, run_id: str, name: str, uri: str, version: int | None = None, active: bool = False) -> int:
        """Records `uri` as a version of model `name` for this run, once (a second call returns the first's).

        `version` None = the next free number; a given version (the sampler's) is linked, its row added if absent.
        """
        for _ in range(5):
            try:
                with self.catalog.session() as s:
                    row = s.get(TrainingRunRow, run_id)
                    if row is None:
                        raise NotFound(f"run {run_id!r} does not exist")
                    if row.model_version is not None:
                        return row.model_version
                    if version is None:
                        latest = s.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name))
                        version = (latest or 0) + 1
                    if s.get(ModelVersionRow, (name, version)) is None:
                        s.add(ModelVersionRow(name=name, version=version, uri=uri, source_run_id=run_id, active=active))
                    row.model_version = version
                    row.checkpoint_uri = uri
                    s.add(RunEventRow(run_id=run_id, kind="log", message=f"published {name} version {version}"))
                    return version
            except IntegrityError:
                version = None  # another publisher took that version number; take the next
                continue
        raise RuntimeError(f"could not allocate a version of {name}")

    def activate(self, name: str, version: int) -> None:
        """Marks `version` as the one the sampler serves (and no other version of `name`)."""
        with self.catalog.session() as s:
            s.execute(update(ModelVersionRow).where(ModelVersionRow.name == name).values(active=False))
            s.execute(
                update(ModelVersionRow)
                .where(ModelVersionRow.name == name, ModelVersionRow.version == version)
                .values(active=True)
            )

    def model_version(self, name: str, version: int) -> ModelVersionRow | None:
        with self.catalog.session() as s:
            return s.get(ModelVersionRow, (name, version))
