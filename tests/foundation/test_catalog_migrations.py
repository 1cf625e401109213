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
