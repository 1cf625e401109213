"""The curation workflow by batches on a PostgreSQL catalog, the real services and the Redis broker: one claim per
batch that leaves done rows alone, a bounded number of catalog statements per batch whatever its size, a redelivered
batch that does nothing twice, a poison image that fails alone, and a worker SIGKILLed mid-batch that loses nothing
and duplicates nothing."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, update

from pony_common.blobs import BlobStore
from pony_common.catalog.db import catalog_for, count_statements
from pony_common.catalog.models import EmbeddingRow, ImageRow, StyleAssignmentRow
from pony_common.celery_app import configure_app
from pony_common.config import Settings
from services.curation import tasks
from services.curation.dispatch import batches, submit_images, wait_for_images
from services.curation.ingest import store_items
from services.curation.samples import write_sample_pool
from services.curation.sources import iter_source
from services.curation.store import StageRow, claim_batch, complete_batch
from tests.conftest import fresh_postgres_database
from tests.curation.conftest import REQUIRED, wait_until
from tests.curation.ledger_checks import assert_processed_exactly_once, count, stages


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[object]:
    """captioner, scorer, style-tagger and safety on localhost, on a fresh PostgreSQL catalog shared with the
    workers (the style tagger and safety read it too)."""
    from services.stack.stack_thread import StackThread

    root = Path(__file__).resolve().parents[2]
    missing = [s for s in REQUIRED if not (root / "services" / s / "app.py").exists()]
    if missing:
        pytest.fail(f"services not in this checkout: {', '.join(missing)}")
    with fresh_postgres_database("pony_batches") as url:
        state = tmp_path_factory.mktemp("batches-state")
        settings = Settings.from_env(
            {}, state_dir=str(state), models_dir=str(tiny_models), database_url=url, log_level="WARNING"
        )
        stack = StackThread(settings)
        try:
            yield stack
        finally:
            stack.close()
            catalog_for(url).dispose()


@pytest.fixture
def pg_settings(pg_stack, redis_url: str) -> Settings:
    """The stack's settings on the Redis broker, with short retries and visibility timeout."""
    return pg_stack.settings.replace(
        broker_url=redis_url,
        result_backend=redis_url,
        task_retry_backoff_s=0.5,
        task_max_retries=12,
        rpc_timeout_s=30.0,
        broker_visibility_timeout_s=10.0,
    )


def _stored(settings: Settings, root: Path, seed: int, per_category: int, categories: tuple[str, ...]) -> list[str]:
    """A sample pool stored in the catalog and blob store (not sent): its image ids in pool order."""
    pool = write_sample_pool(
        root,
        per_category=per_category,
        near_duplicates=0,
        corrupt=0,
        blocked=0,
        size=48,
        seed=seed,
        categories=categories,
    )
    summary = store_items(settings, iter_source(str(pool.root), settings))
    ids = summary.ids
    assert len(ids) == per_category * len(categories) and {i.status for i in summary.images} == {"ingested"}
    return ids


def test_one_claim_per_batch_returns_only_what_is_not_done(postgres_url: str) -> None:
    from tests.curation.pool import add_processed

    catalog = catalog_for(postgres_url)
    ids = [add_processed(catalog, f"claim-{i}", "pony", 0.5, status="processing") for i in range(5)]
    with catalog.session() as s, count_statements(catalog.engine) as n:
        assert claim_batch(s, ids, "caption") == ids
    assert n.statements == 1
    with catalog.session() as s:
        assert complete_batch(s, ids[:3], "caption") == ids[:3]
    # A redelivered batch claims only the rest, in one statement, and completes each row once.
    with catalog.session() as s, count_statements(catalog.engine) as n:
        assert claim_batch(s, list(reversed(ids)), "caption") == list(reversed(ids[3:]))
    assert n.statements == 1
    with catalog.session() as s:
        assert complete_batch(s, ids, "caption") == ids[3:]
        assert complete_batch(s, ids, "caption") == []
        rows = {r.image_id: r for r in s.scalars(select(StageRow).where(StageRow.image_id.in_(ids)))}
    assert {r.status for r in rows.values()} == {"done"} and {r.writes for r in rows.values()} == {1}
    assert [rows[i].attempts for i in ids] == [1, 1, 1, 2, 2]


def test_catalog_statements_per_batch_do_not_grow_with_the_batch(pg_settings: Settings, tmp_path: Path) -> None:
    settings = pg_settings
    configure_app(settings)
    catalog = catalog_for(settings.database_url)
    ids = _stored(settings, tmp_path / "pool", 31, 2, ("pony", "anime", "furry", "western"))
    per_stage: dict[int, dict[str, int]] = {}
    for size, batch in ((2, ids[:2]), (6, ids[2:8])):
        with catalog.session() as s:
            s.execute(update(ImageRow).where(ImageRow.id.in_(batch)).values(status="processing"))
        per_stage[size] = {}
        for stage in tasks.STAGES:
            with count_statements(catalog.engine, this_thread=True) as n:
                out = getattr(tasks, stage).apply(args=[batch]).get()
            assert out["failed"] == 0, (stage, out)
            per_stage[size][stage] = n.statements
        assert_processed_exactly_once(settings, batch)
    # The same few statements for a batch of 2 and of 6: bulk reads and writes, one claim per batch.
    assert per_stage[2] == per_stage[6], per_stage
    assert all(n <= 6 for n in per_stage[6].values()), per_stage
    # One CLIP embedding per image (the scorer's pass, shared); before any cluster set exists the style stage runs
    # no image tower: it keeps only the palette, on a palette-only assignment row.
    assert count(settings, EmbeddingRow, ids[:8]) == 8
    assert count(settings, StyleAssignmentRow, ids[:8]) == 8


def test_a_redelivered_batch_does_nothing_twice(pg_settings: Settings, workers, tmp_path: Path) -> None:
    settings = pg_settings.replace(curation_batch_size=3)
    ids = _stored(settings, tmp_path / "pool", 32, 1, ("pony", "anime", "realism"))
    assert submit_images(settings, ids) == ids
    tasks.workflow(ids).apply_async()  # the same batch again, as a lost ack or a second `ponyctl ingest` sends it
    workers(settings)
    assert wait_for_images(settings, ids, progress=False, timeout_s=300) == {"done": 3}
    # Both copies ran to the end (one solo worker runs them one after the other): the second claimed nothing.
    wait_until(lambda: _broker_idle(settings), 120, "both copies to finish")
    rows = assert_processed_exactly_once(settings, ids)
    assert {r.attempts for r in rows} == {1}
    assert count(settings, EmbeddingRow, ids) == len(ids)


def _broker_idle(settings: Settings) -> bool:
    """No message waits in a queue and none is being worked on (unacked) on the Redis broker."""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        lists = [k for k in client.keys("*") if client.type(k) == b"list"]
        return sum(client.llen(k) for k in lists) == 0 and client.hlen("unacked") == 0
    finally:
        client.close()


def test_a_poison_image_fails_alone_and_the_rest_of_its_batch_is_done(
    pg_settings: Settings, workers, tmp_path: Path
) -> None:
    settings = pg_settings.replace(curation_batch_size=4)
    ids = _stored(settings, tmp_path / "pool", 33, 1, ("pony", "anime", "furry", "western"))
    catalog = catalog_for(settings.database_url)
    poison = ids[1]
    with catalog.session() as s:
        key = s.get(ImageRow, poison).blob_key
    BlobStore(settings.blob_url).put(key, b"\x89PNG\r\n\x1a\n not an image after all")
    workers(settings)
    assert submit_images(settings, ids) == ids
    assert wait_for_images(settings, ids, progress=False, timeout_s=300) == {"done": 3, "failed": 1}
    with catalog.session() as s:
        row = s.get(ImageRow, poison)
    assert row.status == "failed" and "caption: invalid" in row.error and "score: invalid" in row.error
    assert_processed_exactly_once(settings, [i for i in ids if i != poison])
    ledger = {r.stage: r for r in stages(settings, [poison])}
    assert {ledger[s].status for s in ("caption", "score")} == {"failed"} and ledger["persist"].status == "done"


def test_a_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(
    pg_settings: Settings, workers, tmp_path: Path
) -> None:
    settings = pg_settings.replace(curation_batch_size=3)
    ids = _stored(settings, tmp_path / "pool", 34, 1, ("pony", "furry", "anime", "realism", "western", "other"))
    assert len(batches(ids, 3)) == 2
    first = workers(settings, "a")
    assert submit_images(settings, ids) == ids

    def running() -> list[StageRow]:
        return [r for r in stages(settings, ids) if r.status == "running"]

    wait_until(lambda: bool(running()), 180, "worker a to start a batch")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    cut_off = {(r.image_id, r.stage) for r in running()}
    assert cut_off and len({stage for _, stage in cut_off}) == 1  # one batch of one stage, cut off mid-way
    workers(settings, "b")
    assert wait_for_images(settings, ids, progress=False, timeout_s=400) == {"done": 6}
    rows = assert_processed_exactly_once(settings, ids)
    redone = [r for r in rows if (r.image_id, r.stage) in cut_off]
    assert len(redone) == len(cut_off) and all(r.attempts >= 2 for r in redone)
    catalog = catalog_for(settings.database_url)
    with catalog.session() as s:
        per_kind = dict(
            s.execute(
                select(EmbeddingRow.kind, func.count())
                .where(EmbeddingRow.image_id.in_(ids))
                .group_by(EmbeddingRow.kind)
            ).all()
        )
    assert per_kind == {"clip": 6}
