"""Fixtures of the workflow tests: the four curation services on free ports (once per module), Celery workers as
`ponyctl worker` subprocesses on the test's settings (Redis broker), stopped in a finally."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pony_common.config import Settings
from pony_common.workers import CURATION_QUEUES, start_worker, stop_worker

REQUIRED = ("captioner", "scorer", "style_tagger", "safety")


@pytest.fixture(scope="module")
def service_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[object]:
    """captioner, scorer, style-tagger and safety on localhost, sharing one catalog with the workers."""
    from services.stack.stack_thread import StackThread

    root = Path(__file__).resolve().parents[2]
    missing = [s for s in REQUIRED if not (root / "services" / s / "app.py").exists()]
    if missing:
        pytest.fail(f"services not in this checkout: {', '.join(missing)}")
    state = tmp_path_factory.mktemp("curation-state")
    settings = Settings.from_env({}, state_dir=str(state), models_dir=str(tiny_models), log_level="WARNING")
    stack = StackThread(settings)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def workflow_settings(service_stack, redis_url: str) -> Settings:
    """The stack's settings on the Redis broker and result backend, with short retries and visibility timeout."""
    return service_stack.settings.replace(
        broker_url=redis_url,
        result_backend=redis_url,
        task_retry_backoff_s=0.5,
        task_max_retries=12,
        rpc_timeout_s=30.0,
        broker_visibility_timeout_s=6.0,
    )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """`workers(settings)` starts a curation worker (all five queues unless `queues` says which, solo pool); all
    are stopped afterwards."""
    procs: list[subprocess.Popen] = []

    def start(settings: Settings, name: str = "w", queues: Sequence[str] = CURATION_QUEUES) -> subprocess.Popen:
        log_path = tmp_path / f"worker-{name}-{len(procs)}.log"
        proc = start_worker(settings, queues, name=name, log_path=log_path)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            stop_worker(proc)


def wait_until(check: Callable[[], bool], timeout: float, what: str, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
