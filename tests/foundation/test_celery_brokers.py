"""Celery on each broker (embedded sqla, Redis, RabbitMQ): a round trip through a real worker process, and a
worker killed with SIGKILL mid-task whose task is redelivered and whose catalog write happens exactly once."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from pony_common.catalog import catalog_for, upsert
from pony_common.catalog.models import ImageRow
from pony_common.celery_app import configure_app
from pony_common.config import Settings
from pony_common.workers import start_worker, stop_worker
from services.curation.store import StageRow

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def worker(settings: Settings, name: str, queues: str = "default,persist", **extra: str) -> Iterator[subprocess.Popen]:
    """`ponyctl worker` as its own process with this test's task module, stopped afterwards (SIGTERM, then KILL)."""
    settings = settings.replace(extra={**settings.extra, **extra})
    log = Path(settings.state_dir) / f"{name}.log"
    proc = start_worker(settings, queues.split(","), name=name, log_path=log, include=["tests.foundation.celery_tasks"])
    try:
        yield proc
    finally:
        stop_worker(proc)


def broker_settings(kind: str, settings: Settings, request: pytest.FixtureRequest) -> Settings:
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        return settings.replace(broker_url=url, result_backend=url)
    if kind == "rabbitmq":
        return settings.replace(broker_url=request.getfixturevalue("rabbitmq_url"))
    return settings


@pytest.mark.parametrize("kind", ["sqla", "redis", "rabbitmq"])
def test_round_trip_through_a_worker(kind: str, settings: Settings, request: pytest.FixtureRequest) -> None:
    settings = broker_settings(kind, settings, request)
    app = configure_app(settings)
    from pony_common.celery_app import ping

    with worker(settings, f"rt-{kind}"):
        result = ping.delay(f"hello {kind}")
        assert result.get(timeout=60)["payload"] == f"hello {kind}"
    app.close()


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_sigkilled_worker_task_is_redelivered_and_written_once(
    kind: str, settings: Settings, request: pytest.FixtureRequest
) -> None:
    settings = broker_settings(kind, settings, request)
    catalog = catalog_for(settings.database_url)
    image = "c" * 64
    with catalog.session() as s:
        upsert(s, ImageRow, {"id": image, "blob_key": "k", "tags": [], "characters": []}, keys=("id",))
    app = configure_app(settings)
    from tests.foundation.celery_tasks import slow_complete

    def stage() -> StageRow | None:
        with catalog.session() as s:
            return s.scalar(select(StageRow).where(StageRow.image_id == image))

    extra = {"PONY_BROKER_VISIBILITY_TIMEOUT_S": "3"}
    with worker(settings, f"victim-{kind}", **extra) as victim:
        slow_complete.delay(image, "persist", 3.0)
        wait_for(lambda: (row := stage()) is not None and row.status == "running", 60, "the task to start")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    row = stage()
    assert row is not None and row.status == "running" and row.writes == 0
    with worker(settings, f"rescuer-{kind}", **extra):
        wait_for(lambda: stage().status == "done", 90, "the redelivered task to finish")
    row = stage()
    assert row.writes == 1
    assert row.attempts == 2
    app.close()
