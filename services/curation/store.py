"""The curation tier's own tables and their writes: the stage ledger (claims and completes (image, stage) with
conditional writes, so a redelivered task is harmless; one statement per batch) and named selections."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, bindparam, literal_column, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from pony_common.catalog.db import Catalog, bulk_upsert, id_in, insert_for, upsert
from pony_common.catalog.models import IMAGE_FK, TS, Base, utcnow


class StageRow(Base):
    """The idempotency ledger of the curation workflow: one row per (image, stage)."""

    __tablename__ = "stages"
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    # pending | running | done | failed
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    writes: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None] = mapped_column(TS)
    finished_at: Mapped[dt.datetime | None] = mapped_column(TS)


class StageCountRow(Base):
    """Deltas of the ledger's (stage, status) counts, written by database triggers on `stages` (migration 0006);
    a count is the sum of its key's rows. `status` reads them and compacts them."""

    __tablename__ = "stage_counts"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(BigInteger)


class SelectionRow(Base):
    """An image of a named selection. No foreign key (migration 0006: its check locked every chosen image row): the
    selection is written from `images` in one statement, and a trigger deletes an image's rows with the image."""

    __tablename__ = "selections"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    image_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer)
    category: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


def _advance(catalog: Catalog, image_id: str, stage: str, first: dict[str, Any], **values: Any) -> bool:
    """Creates the (image, stage) row as `first` if missing, then applies `values` unless the stage is done.
    True when this call changed the row: the conditional write that makes a redelivered task harmless."""
    with catalog.session() as s:
        row = {"image_id": image_id, "stage": stage, "attempts": 0, "writes": 0, **first}
        upsert(s, StageRow, row, keys=("image_id", "stage"), update=())
        res = s.execute(
            update(StageRow)
            .where(StageRow.image_id == image_id, StageRow.stage == stage, StageRow.status != "done")
            .values(**values)
        )
        return res.rowcount == 1


def claim_stage(catalog: Catalog, image_id: str, stage: str) -> bool:
    """Marks (image, stage) running unless it is already done. False = done already: skip the work."""
    return _advance(
        catalog,
        image_id,
        stage,
        {"status": "pending"},
        status="running",
        attempts=StageRow.attempts + 1,
        started_at=utcnow(),
        error=None,
    )


def complete_stage(catalog: Catalog, image_id: str, stage: str) -> bool:
    """Marks (image, stage) done; True only for the call that made the transition (exactly-once effects)."""
    return _advance(
        catalog,
        image_id,
        stage,
        {"status": "pending"},
        status="done",
        writes=StageRow.writes + 1,
        finished_at=utcnow(),
        error=None,
    )


def fail_stage(catalog: Catalog, image_id: str, stage: str, error: str) -> None:
    """Records a permanent failure with its reason (a later successful run still wins)."""
    _advance(
        catalog,
        image_id,
        stage,
        {"status": "failed", "attempts": 1, "error": error},
        status="failed",
        error=error,
        finished_at=utcnow(),
    )


def stage_row(catalog: Catalog, image_id: str, stage: str) -> StageRow | None:
    with catalog.session() as s:
        return s.scalar(select(StageRow).where(StageRow.image_id == image_id, StageRow.stage == stage))


# --- a batch of images at a time: one statement each (Core, so nothing is compiled per row) -----------------------

_stages = StageRow.__table__


def claim_batch(session: Session, image_ids: Sequence[str], stage: str) -> list[str]:
    """Marks (image, stage) running for every image of the batch whose stage is not done, in ONE statement (INSERT …
    ON CONFLICT DO UPDATE … WHERE status <> 'done' RETURNING); returns the claimed ids in batch order. What a
    redelivered batch finished already is not returned: the work is only the rest."""
    ids = list(dict.fromkeys(image_ids))
    if not ids:
        return []
    now = utcnow()
    rows = [
        {
            "image_id": i,
            "stage": stage,
            "status": "running",
            "attempts": 1,
            "writes": 0,
            "started_at": now,
            "error": None,
        }
        for i in ids
    ]
    c = _stages.c
    offered = insert_for(session, _stages).excluded
    # Every value comes from the offered row or is a literal: the claim stays ONE multi-row INSERT (insertmanyvalues
    # sends a statement per row when other parameters are bound).
    claimed = set(
        bulk_upsert(
            session,
            StageRow,
            rows,
            keys=("image_id", "stage"),
            set_={
                "status": offered.status,
                "attempts": c.attempts + offered.attempts,
                "started_at": offered.started_at,
                "error": offered.error,
            },
            where=c.status != literal_column("'done'"),
            returning=c.image_id,
        )
    )
    return [i for i in ids if i in claimed]


def complete_batch(session: Session, image_ids: Sequence[str], stage: str) -> list[str]:
    """Marks (image, stage) done for the images not done yet, in one statement; returns the ids this call moved
    to done, in batch order (a copy of the batch running at the same time moves none of them again: exactly-once
    effects)."""
    if not image_ids:
        return []
    c = _stages.c
    stmt = (
        update(_stages)
        .where(id_in(session, c.image_id, image_ids), c.stage == stage, c.status != "done")
        .values(status="done", writes=c.writes + 1, finished_at=utcnow(), error=None)
        .returning(c.image_id)
    )
    moved = set(session.scalars(stmt))
    return [i for i in image_ids if i in moved]


def fail_batch(session: Session, failures: Mapping[str, str], stage: str) -> None:
    """Records each image's permanent failure with its own reason (one executemany; a done stage stays done)."""
    if not failures:
        return
    c = _stages.c
    stmt = (
        update(_stages)
        .where(c.image_id == bindparam("b_image_id"), c.stage == stage, c.status != "done")
        .values(status="failed", error=bindparam("b_error"), finished_at=utcnow())
    )
    session.execute(stmt, [{"b_image_id": i, "b_error": e} for i, e in failures.items()])


def wait_batch(session: Session, image_ids: Sequence[str], stage: str, note: str) -> None:
    """Shows a parked batch in the ledger (`waiting` + its reason) in one statement; the retry's claim clears it."""
    if not image_ids:
        return
    c = _stages.c
    session.execute(
        update(_stages)
        .where(id_in(session, c.image_id, image_ids), c.stage == stage, c.status == "running")
        .values(status="waiting", error=note)
    )


def ledger(session: Session, image_ids: Sequence[str], stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ledger rows (image_id, stage, status, error) of the batch for `stages`, per image then stage (one
    SELECT)."""
    out: dict[str, dict[str, Any]] = {}
    c = _stages.c
    query = select(c.image_id, c.stage, c.status, c.error).where(
        id_in(session, c.image_id, image_ids), c.stage.in_(list(stages))
    )
    for row in session.execute(query):
        out.setdefault(row.image_id, {})[row.stage] = row
    return out
