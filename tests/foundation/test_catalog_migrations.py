"""Alembic upgrade and downgrade of the catalog on SQLite and on PostgreSQL; idempotent upserts."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from pony_common.catalog import Catalog, downgrade, upgrade, upsert
from pony_common.catalog.db import make_engine
from pony_common.catalog.models import ImageRow
from services.curation.store import StageRow, claim_stage, complete_stage
from services.stack.registry import load_all_tables


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def check_round_trip(url: str) -> None:
    owned = load_all_tables()  # the shared tables and every service's store.py
    upgrade(url)
    assert tables(url) == owned
    downgrade(url, "base")
    assert tables(url) == set()
    upgrade(url)
    assert tables(url) == owned


def test_upgrade_and_downgrade_on_sqlite(tmp_path: Path) -> None:
    check_round_trip(f"sqlite:///{tmp_path / 'catalog.db'}")


def test_upgrade_and_downgrade_on_postgresql(postgres_url: str) -> None:
    check_round_trip(postgres_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Catalog:
    url = f"sqlite:///{tmp_path / 'c.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    cat = Catalog(url)
    yield cat
    cat.dispose()


def test_upsert_is_idempotent_and_updates(catalog: Catalog) -> None:
    row = {"id": "a" * 64, "blob_key": "images/aa/x.png", "category": "pony", "tags": ["1girl"], "characters": []}
    for _ in range(3):
        with catalog.session() as s:
            upsert(s, ImageRow, row, keys=("id",))
    with catalog.session() as s:
        upsert(s, ImageRow, {**row, "category": "anime"}, keys=("id",), update=("category",))
    with catalog.session() as s:
        rows = s.scalars(select(ImageRow)).all()
    assert len(rows) == 1
    assert rows[0].category == "anime"
    assert rows[0].tags == ["1girl"]


def test_stage_ledger_completes_exactly_once(catalog: Catalog) -> None:
    image = "b" * 64
    with catalog.session() as s:
        upsert(s, ImageRow, {"id": image, "blob_key": "k", "tags": [], "characters": []}, keys=("id",))
    assert claim_stage(catalog, image, "caption") is True
    assert complete_stage(catalog, image, "caption") is True
    assert complete_stage(catalog, image, "caption") is False  # a redelivered task
    assert claim_stage(catalog, image, "caption") is False  # done work is not claimed again
    with catalog.session() as s:
        row = s.scalar(select(StageRow))
    assert (row.status, row.writes, row.attempts) == ("done", 1, 1)


def test_upgrading_a_sqlite_catalog_keeps_the_rows_that_reference_images(tmp_path: Path) -> None:
    """Adding a column to `images` must not copy and drop the table on SQLite: with foreign keys on, the drop
    would cascade into every table that references an image (migration 0005 once emptied aesthetic_scores)."""
    from sqlalchemy import func, text

    from pony_common.catalog.models import AestheticScoreRow

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0004")
    old = Catalog(url, migrate=False)
    image_id = "a" * 64
    with old.session() as s:
        s.execute(
            text(
                "INSERT INTO images (id, blob_key, category, tags, characters, is_duplicate, status, ingested_at, "
                "updated_at) VALUES (:id, 'k.png', 'pony', '[]', '[]', 0, 'done', '2026-01-01', '2026-01-01')"
            ),
            {"id": image_id},
        )
        upsert(
            s,
            AestheticScoreRow,
            {
                "image_id": image_id,
                "raw": 1.0,
                "score": 0.75,
                "score_tag": "score_7",
                "model": "m",
                "model_version": "1",
                "head_version": "h",
            },
            keys=("image_id",),
        )
    old.dispose()
    catalog = Catalog(url)  # migrates to head
    try:
        with catalog.session() as s:
            assert s.scalar(select(func.count()).select_from(AestheticScoreRow)) == 1
            assert s.get(ImageRow, image_id).score == 0.75
    finally:
        catalog.dispose()
