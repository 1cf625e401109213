"""Reliability of the curation workflow on the real services and Redis broker: a worker SIGKILLed mid-task loses
nothing and repeats no effect (the visibility timeout hands its task to another worker), and tasks wait out a
stopped service and finish when it is back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sqlalchemy import select

from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from services.curation.dispatch import wait_for_images
from services.curation.ingest import ingest_source
from services.curation.samples import write_sample_pool
from services.curation.status import curation_status
from services.curation.store import StageRow
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


def test_tasks_wait_while_a_service_is_down_and_finish_when_it_is_back(
    service_stack, workflow_settings: Settings, workers, tmp_path: Path
) -> None:
    # Enough retries to outlast the outage (each waits at most half the 6 s visibility timeout).
    settings = workflow_settings.replace(task_max_retries=100)
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
    service_stack.stop_service("scorer")
    try:
        workers(settings)
        ids = ingest_source(settings, str(pool.root), wait=False, progress=False).submitted
        assert len(ids) == 2

        seen: set[str] = set()

        def retrying() -> bool:
            for r in stages(settings, ids):
                if r.stage == "score" and r.status == "pending" and "unavailable" in (r.error or ""):
                    seen.add(r.image_id)
            return seen == set(ids)

        wait_until(retrying, 240, "both score tasks to wait on UNAVAILABLE")
        wait_until(
            lambda: sum(r.status == "done" and r.stage in ("caption", "safety") for r in stages(settings, ids)) == 4,
            240,
            "the other stages to go on",
        )
        catalog = catalog_for(settings.database_url)
        wait_until(
            lambda: any(f.stage == "score" and "unavailable" in f.reason for f in curation_status(catalog).retrying),
            60,
            "status to list the waiting retries",
        )
        with catalog_for(settings.database_url).session() as s:
            assert set(s.scalars(select(ImageRow.status).where(ImageRow.id.in_(ids)))) == {"processing"}
    finally:
        service_stack.start_service("scorer")
    assert wait_for_images(settings, ids, progress=False, timeout_s=300) == {"done": 2}
    rows = assert_processed_exactly_once(settings, ids)
    assert all(r.attempts >= 2 for r in rows if r.stage == "score")
