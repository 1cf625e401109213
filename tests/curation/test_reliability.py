"""Reliability of the curation workflow (by batches) on the real services and Redis broker: a worker SIGKILLed mid-task
loses nothing and repeats no effect (the visibility timeout hands its batch to another worker); a batch waits out a
stopped service however long it is down and finishes when it is back; images left mid-way are finished by running
the ingest again; a broker that is down and a missing worker end `ponyctl ingest` with one line, leaving nothing
that a later run cannot finish."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from pony_common.blobs import BlobStore
from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.cli.main import main
from pony_common.config import Settings
from pony_common.images import image_id
from pony_common.workers import stop_worker
from services.curation.dispatch import wait_for_images
from services.curation.ingest import ingest_source
from services.curation.samples import write_sample_pool
from services.curation.status import curation_status, format_status
from services.curation.store import StageRow, stage_row
from tests.conftest import free_port
from tests.curation.conftest import wait_until
from tests.curation.ledger_checks import assert_processed_exactly_once, stages


def test_a_worker_killed_mid_task_loses_nothing_and_repeats_no_effect(
    workflow_settings: Settings, workers, tmp_path: Path
) -> None:
    settings = workflow_settings
    pool = write_sample_pool(
        tmp_path / "pool",
        per_category=1,
        near_duplicates=0,
        corrupt=0,
        blocked=0,
        size=48,
        seed=12,
        categories=("pony", "furry", "anime", "realism"),
    )
    first = workers(settings, "a")
    summary = ingest_source(settings, str(pool.root), wait=False, progress=False)
    ids = summary.submitted
    assert len(ids) == 4

    def running() -> list[StageRow]:
        return [r for r in stages(settings, ids) if r.status == "running"]

    wait_until(lambda: bool(running()), 180, "worker a to start a task")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    # Nobody else touches the ledger now: what was running was cut off mid-task.
    cut_off = {(r.image_id, r.stage) for r in running()}
    assert cut_off
    workers(settings, "b")
    counts = wait_for_images(settings, ids, progress=False, timeout_s=400)
    assert counts == {"done": 4}
    rows = assert_processed_exactly_once(settings, ids)
    redone = [r for r in rows if (r.image_id, r.stage) in cut_off]
    assert redone and all(r.attempts >= 2 for r in redone)


def test_a_service_down_longer_than_the_old_retry_budget_parks_its_stage_and_nothing_fails(
    service_stack, workflow_settings: Settings, workers, tmp_path: Path
) -> None:
    # A retry budget of one retry (0.5 s): under the old rule a stage failed for good on its second attempt. Parked
    # stages retry at least every second here, so the outage outlasts that budget many times over.
    settings = workflow_settings.replace(task_max_retries=1, task_retry_backoff_s=0.5, task_retry_max_backoff_s=1.0)
    old_rule_attempts = settings.task_max_retries + 1
    pool = write_sample_pool(
        tmp_path / "pool",
        per_category=1,
        near_duplicates=0,
        corrupt=0,
        blocked=0,
        size=48,
        seed=13,
        categories=("pony", "anime"),
    )
    catalog = catalog_for(settings.database_url)
    service_stack.stop_service("scorer")
    try:
        workers(settings)
        ids = ingest_source(settings, str(pool.root), wait=False, progress=False).submitted
        assert len(ids) == 2

        def past_the_old_budget() -> bool:
            score = [r for r in stages(settings, ids) if r.stage == "score"]
            return len(score) == 2 and all(r.attempts > old_rule_attempts + 1 for r in score)

        wait_until(past_the_old_budget, 240, "both score stages to retry past the old budget")
        # The batch's captions are done; style and safety come after score (they use its CLIP embeddings): they wait.
        wait_until(
            lambda: sum(r.status == "done" and r.stage == "caption" for r in stages(settings, ids)) == 2,
            240,
            "the captions",
        )
        assert not [r for r in stages(settings, ids) if r.stage in ("style", "safety", "persist")]

        # Each stage is `waiting` between its retries (a retry claims it back): collect what the ledger and
        # `ponyctl status` show over a few polls.
        in_ledger: set[str] = set()
        in_status: set[str] = set()
        status_lines: set[str] = set()

        def parked() -> bool:
            for r in stages(settings, ids):
                if r.stage == "score" and r.status == "waiting" and "unavailable" in (r.error or ""):
                    in_ledger.add(r.image_id)
            status = curation_status(catalog)
            in_status.update(f.image_id for f in status.retrying if f.stage == "score" and "unavailable" in f.reason)
            status_lines.update(line for line in format_status(status).splitlines() if "waiting on a service" in line)
            return in_ledger == in_status == set(ids) and bool(status_lines)

        wait_until(parked, 60, "both score stages to show as waiting on UNAVAILABLE, in the ledger and the status")
        # Nothing failed: not a stage, not an image.
        assert not [r for r in stages(settings, ids) if r.status == "failed"]
        with catalog.session() as s:
            assert set(s.scalars(select(ImageRow.status).where(ImageRow.id.in_(ids)))) == {"processing"}
    finally:
        service_stack.start_service("scorer")
    assert wait_for_images(settings, ids, progress=False, timeout_s=300) == {"done": 2}
    rows = assert_processed_exactly_once(settings, ids)
    assert all(r.attempts > old_rule_attempts + 1 for r in rows if r.stage == "score")


def _pool(root: Path, seed: int, categories: tuple[str, ...]) -> tuple[Path, list[str]]:
    """A small sample pool and the image ids of its images, in pool order."""
    pool = write_sample_pool(
        root, per_category=1, near_duplicates=0, corrupt=0, blocked=0, size=48, seed=seed, categories=categories
    )
    return pool.root, [image_id((pool.root / rel).read_bytes()) for rel in pool.images]


def _use(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment `ponyctl` reads its settings from."""
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)


def _statuses(settings: Settings, ids: list[str]) -> dict[str, str]:
    with catalog_for(settings.database_url).session() as s:
        return dict(s.execute(select(ImageRow.id, ImageRow.status).where(ImageRow.id.in_(ids))).tuples().all())


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_rerun_and_resume_finish_images_left_mid_way_exactly_once(
    workflow_settings: Settings, workers, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    settings = workflow_settings
    _use(settings, monkeypatch)

    # Left mid-way: only captions ran, then the broker lost every queued message (the score, style and safety
    # parts and the chord's state), as a Redis restarted without persistence does.
    root, ids = _pool(tmp_path / "pool", 21, ("pony", "anime", "furry"))
    caption_only = workers(settings, "captions", queues=("caption",))
    assert sorted(ingest_source(settings, str(root), wait=False, progress=False).submitted) == sorted(ids)
    wait_until(
        lambda: sum(r.stage == "caption" and r.status == "done" for r in stages(settings, ids)) == 3,
        240,
        "the captions",
    )
    stop_worker(caption_only)
    redis.Redis.from_url(redis_url).flushdb()
    assert set(_statuses(settings, ids).values()) == {"processing"}
    assert {r.stage for r in stages(settings, ids)} <= {"caption", "score", "style", "safety"}

    # Failed for good (their blobs vanished before any stage ran), then the blobs are back: `--resume` retries
    # them. One of them is as main's `--resume` left such images: `processing`, with persist done.
    root2, failed = _pool(tmp_path / "pool2", 22, ("realism", "western"))
    assert sorted(ingest_source(settings, str(root2), wait=False, progress=False).submitted) == sorted(failed)
    blobs = BlobStore(settings.blob_url)
    with catalog_for(settings.database_url).session() as s:
        keys = [s.get(ImageRow, i).blob_key for i in failed]
    saved = {key: blobs.get(key) for key in keys}
    for key in keys:
        blobs.delete(key)
    workers(settings, "all")
    assert wait_for_images(settings, failed, progress=False, timeout_s=300) == {"failed": 2}
    for key, data in saved.items():
        blobs.put(key, data)
    catalog = catalog_for(settings.database_url)
    with catalog.session() as s:
        s.execute(update(ImageRow).where(ImageRow.id == failed[1]).values(status="processing", error=None))
    assert stage_row(catalog, failed[1], "persist").status == "done"

    # A plain re-run sends every unfinished image, whatever stage it stopped in.
    capsys.readouterr()
    assert main(["ingest", str(root), "--no-progress", "--timeout", "300"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (out["submitted"], out["finished"]) == (3, {"done": 3})
    assert main(["ingest", str(root2), "--no-progress", "--timeout", "300"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (out["submitted"], out["finished"]) == (1, {"done": 1})
    assert _statuses(settings, failed) == {failed[0]: "failed", failed[1]: "done"}
    # `--resume` also retries what failed.
    assert main(["ingest", str(root2), "--resume", "--no-progress", "--timeout", "300"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (out["submitted"], out["finished"]) == (1, {"done": 1})
    assert_processed_exactly_once(settings, ids + failed)


def test_ingest_with_the_broker_down_marks_nothing_in_flight_and_a_rerun_finishes(
    workflow_settings: Settings, workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    root, ids = _pool(tmp_path / "pool", 23, ("pony", "western"))
    _use(workflow_settings.replace(broker_url=down, result_backend=down), monkeypatch)
    capsys.readouterr()
    assert main(["ingest", str(root), "--no-progress"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "cannot reach the broker" in line and "PONY_BROKER_URL" in line and "Traceback" not in line
    # Stored, but nothing marked in flight: nothing was published.
    assert _statuses(workflow_settings, ids) == dict.fromkeys(ids, "ingested")
    assert stages(workflow_settings, ids) == []

    # The broker is back: a plain re-run sends them all.
    _use(workflow_settings, monkeypatch)
    workers(workflow_settings)
    assert main(["ingest", str(root), "--no-progress", "--timeout", "300"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (out["new"], out["submitted"], out["finished"]) == (0, 2, {"done": 2})
    assert_processed_exactly_once(workflow_settings, ids)


def test_ingest_with_no_worker_says_so_after_the_stall_wait_and_leaves_the_images_queued(
    workflow_settings: Settings, workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    settings = workflow_settings.replace(ingest_stall_s=2.0)
    root, ids = _pool(tmp_path / "pool", 24, ("anime",))
    _use(settings, monkeypatch)
    capsys.readouterr()
    assert main(["ingest", str(root), "--no-progress"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "no worker consumes the queues caption, score, style, safety, persist" in line
    assert "`ponyctl worker`" in line
    assert _statuses(settings, ids) == dict.fromkeys(ids, "processing")
    # Resumable: the images wait in the queues and finish once a worker runs.
    workers(settings)
    assert wait_for_images(settings, ids, progress=False, timeout_s=300, stall_s=0) == {"done": 1}
    assert_processed_exactly_once(settings, ids)
