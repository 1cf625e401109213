"""`ponyctl worker --probe` (the worker Deployments' exec probes) against real worker processes on real Redis: it
passes while the worker consumes, fails once the worker is SIGKILLed (stale heartbeat), while its broker is down
(and passes again when it is back), and before a worker ever reached its broker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pony_common.config import Settings
from pony_common.worker_heartbeat import check, write
from pony_common.workers import probe_worker, start_worker, stop_worker
from tests.conftest import free_port

HEARTBEAT_S = 0.5  # the probe then fails once the heartbeat is 1.5 s old
DEADLINE_S = 90.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def probe_until(settings: Settings, passing: bool, what: str, reason: str = "") -> subprocess.CompletedProcess[str]:
    """Runs the probe until it passes (or fails, with `passing` False, saying `reason`); returns that run."""
    runs: list[subprocess.CompletedProcess[str]] = []

    def settled() -> bool:
        runs.append(probe_worker(settings))
        return (runs[-1].returncode == 0) == passing and reason in runs[-1].stderr

    wait_for(settled, what)
    return runs[-1]


@contextmanager
def worker(settings: Settings, name: str) -> Iterator[subprocess.Popen]:
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    proc = start_worker(settings, ["default"], name=name, log_path=Path(settings.state_dir) / f"{name}.log")
    try:
        yield proc
    finally:
        stop_worker(proc)


@contextmanager
def redis_server(port: int, folder: Path) -> Iterator[subprocess.Popen]:
    """A Redis of this test's own (so it can be taken away), on `port`, keeping nothing on disk."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("PONY_REQUIRE_SERVICES") == "1":
            pytest.fail("redis-server is not installed (PONY_REQUIRE_SERVICES=1)")
        pytest.skip("redis-server is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_probe_passes_while_the_worker_consumes_and_fails_once_it_is_killed(settings, redis_url):
    settings = settings.replace(broker_url=redis_url, result_backend=redis_url, worker_heartbeat_s=HEARTBEAT_S)
    heartbeat = Path(settings.worker_heartbeat_file)
    with worker(settings, "probed") as proc:
        probe_until(settings, True, "the probe to pass once the worker consumes")
        assert json.loads(heartbeat.read_text())["pid"] == proc.pid
        proc.kill()  # SIGKILL: nothing cleans up, the heartbeat file stays behind
        proc.wait(30)
        failed = probe_until(settings, False, "the probe to fail after SIGKILL", reason="stale heartbeat")
    assert heartbeat.exists()
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1


def test_probe_fails_while_the_broker_is_down_and_passes_when_it_is_back(settings, tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = settings.replace(broker_url=url, result_backend=url, worker_heartbeat_s=HEARTBEAT_S)
    with redis_server(port, tmp_path / "redis") as broker, worker(settings, "reconnecting") as proc:
        probe_until(settings, True, "the probe to pass once the worker consumes")
        broker.kill()
        broker.wait(10)
        # The worker drops its heartbeat as soon as it loses the connection (it would go stale anyway).
        probe_until(settings, False, "the probe to fail with the broker gone", reason="not connected to its broker")
        assert proc.poll() is None, "the worker itself keeps running and reconnecting"
        with redis_server(port, tmp_path / "redis"):
            probe_until(settings, True, "the probe to pass once the broker is back")


def test_probe_fails_for_a_worker_that_never_reached_its_broker(settings):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = settings.replace(broker_url=url, result_backend=url, worker_heartbeat_s=HEARTBEAT_S)
    # A fresh heartbeat left in the pod's /tmp by the container before a restart must not vouch for the new one.
    write(Path(settings.worker_heartbeat_file), pid=0)
    assert probe_worker(settings, max_age_s=3600).returncode == 0
    with worker(settings, "unconnected") as proc:
        log = Path(settings.state_dir) / "unconnected.log"
        wait_for(lambda: "Cannot connect" in (log.read_text() if log.exists() else ""), "a failed connection attempt")
        failed = probe_worker(settings, max_age_s=3600)
        assert proc.poll() is None
    assert failed.returncode == 1
    assert "not connected to its broker" in failed.stderr


def test_heartbeat_check_reads_age_and_rejects_garbage(tmp_path):
    path = tmp_path / "worker.heartbeat"
    assert "no heartbeat" in (check(path, 15.0) or "")
    write(path, pid=1)
    at = json.loads(path.read_text())["at"]
    assert check(path, 15.0, now=at + 15.0) is None
    assert "16.0 s old" in (check(path, 15.0, now=at + 16.0) or "")
    path.write_text("{not json")
    assert "unreadable heartbeat" in (check(path, 15.0) or "")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["worker", "--probe", "--max-age", "0"], "--max-age must be more than 0 seconds"),
        (["worker", "--max-age", "5"], "--max-age only goes with --probe"),
    ],
)
def test_probe_arguments_are_checked(argv, reason, capsys, monkeypatch, tmp_path):
    from pony_common.cli.main import main

    monkeypatch.setenv("PONY_STATE_DIR", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"ponyctl worker: {reason}"]
