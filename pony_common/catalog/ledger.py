"""The stage ledger: claims and completes (image, stage) with conditional writes, so redelivery is harmless."""

from __future__ import annotations

from sqlalchemy import select, update

from pony_common.catalog.db import Catalog, upsert
from pony_common.catalog.models import StageRow, utcnow


def claim_stage(catalog: Catalog, image_id: str, stage: str) -> bool:
    """Marks (image, stage) running unless it is already done. False = done already: skip the work."""
    with catalog.session() as s:
        upsert(
            s,
            StageRow,
            {"image_id": image_id, "stage": stage, "status": "pending", "attempts": 0, "writes": 0},
            keys=("image_id", "stage"),
            update=(),
        )
        res = s.execute(
            update(StageRow)
            .where(StageRow.image_id == image_id, StageRow.stage == stage, StageRow.status != "done")
            .values(status="running", attempts=StageRow.attempts + 1, started_at=utcnow(), error=None)
        )
        return res.rowcount == 1


def complete_stage(catalog: Catalog, image_id: str, stage: str) -> bool:
    """Marks (image, stage) done; True only for the call that made the transition (exactly-once effects)."""
    with catalog.session() as s:
        upsert(
            s,
            StageRow,
            {"image_id": image_id, "stage": stage, "status": "pending", "attempts": 0, "writes": 0},
            keys=("image_id", "stage"),
            update=(),
        )
        res = s.execute(
            update(StageRow)
            .where(StageRow.image_id == image_id, StageRow.stage == stage, StageRow.status != "done")
            .values(status="done", writes=StageRow.writes + 1, finished_at=utcnow(), error=None)
        )
        return res.rowcount == 1


def fail_stage(catalog: Catalog, image_id: str, stage: str, error: str) -> None:
    """Records a permanent failure with its reason (a later successful run still wins)."""
    with catalog.session() as s:
        upsert(
            s,
            StageRow,
            {"image_id": image_id, "stage": stage, "status": "failed", "attempts": 1, "writes": 0, "error": error},
            keys=("image_id", "stage"),
            update=(),
        )
        s.execute(
            update(StageRow)
            .where(StageRow.image_id == image_id, StageRow.stage == stage, StageRow.status != "done")
            .values(status="failed", error=error, finished_at=utcnow())
        )


def stage_row(catalog: Catalog, image_id: str, stage: str) -> StageRow | None:
    with catalog.session() as s:
        return s.scalar(select(StageRow).where(StageRow.image_id == image_id, StageRow.stage == stage))
