"""The curation tier's own tables and their writes: the stage ledger (claims and completes (image, stage) with
conditional writes, so a redelivered task is harmless) and named selections."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from pony_common.catalog.db import Catalog, upsert
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


class SelectionRow(Base):
    __tablename__ = "selections"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), primary_key=True)
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
