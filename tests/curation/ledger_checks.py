"""Ledger and catalog checks shared by the workflow tests: each image processed, each effect exactly once."""

from __future__ import annotations

from sqlalchemy import func, select

from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import AestheticScoreRow, CaptionRow, SafetyDecisionRow
from pony_common.config import Settings
from services.curation.store import StageRow

WORKFLOW_STAGES = ("caption", "score", "style", "safety", "persist")


def stages(settings: Settings, ids: list[str]) -> list[StageRow]:
    with catalog_for(settings.database_url).session() as s:
        return list(s.scalars(select(StageRow).where(StageRow.image_id.in_(ids), StageRow.stage.in_(WORKFLOW_STAGES))))


def count(settings: Settings, model: type, ids: list[str]) -> int:
    with catalog_for(settings.database_url).session() as s:
        return s.scalar(select(func.count()).select_from(model).where(model.image_id.in_(ids))) or 0


def assert_processed_exactly_once(settings: Settings, ids: list[str]) -> list[StageRow]:
    rows = stages(settings, ids)
    assert len(rows) == len(ids) * len(WORKFLOW_STAGES)
    assert {(r.status, r.writes) for r in rows} == {("done", 1)}
    with catalog_for(settings.database_url).session() as s:
        kinds = s.execute(
            select(CaptionRow.image_id, func.count()).where(CaptionRow.image_id.in_(ids)).group_by(CaptionRow.image_id)
        ).all()
    assert sorted(n for _, n in kinds) == [4] * len(ids)
    assert count(settings, AestheticScoreRow, ids) == len(ids)
    assert count(settings, SafetyDecisionRow, ids) == len(ids)
    return rows
