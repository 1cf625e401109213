"""Celery workers as subprocesses (`ponyctl worker`) on given settings: for the demo, the tests and the bench; and
`probe_worker`, the Kubernetes probe (`ponyctl worker --probe`) run the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pony_common.config import Settings

CURATION_QUEUES = ("caption", "score", "style", "safety", "persist")
_PONYCTL = (sys.executable, "-m", "pony_common.cli.main")


def _env(settings: Settings) -> dict[str, str]:
    """This process's environment with `settings` in place of any PONY_* (and no prometheus multiprocess folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PONY_", "PROMETHEUS_"))}
    env.update(settings.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_worker(
    settings: Settings,
    queues: Sequence[str] = CURATION_QUEUES,
    *,
    name: str = "curation",
    pool: str = "solo",
    log_path: Path | None = None,
    include: Sequence[str] = (),
    concurrency: int | None = None,
) -> subprocess.Popen:
    """Starts `ponyctl worker --queues ... --pool solo` with `settings` in its environment (`include`: extra
    task modules the worker imports, `--include`)."""
    cmd = [
        *_PONYCTL,
        "worker",
        "--queues",
        ",".join(queues),
        "--pool",
        pool,
        "--hostname",
        f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h",
    ]
    for module in include:
        cmd += ["--include", module]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(cmd, env=_env(settings), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]


def probe_worker(
    settings: Settings, *, max_age_s: float | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Runs `ponyctl worker --probe` (what the worker Deployments' exec probes run) with `settings`: returncode 0
    when a worker with these settings consumes, connected to its broker; 1 and the reason on stderr otherwise."""
    cmd = [*_PONYCTL, "worker", "--probe"]
    if max_age_s is not None:
        cmd += ["--max-age", str(max_age_s)]
    return subprocess.run(cmd, env=_env(settings), capture_output=True, text=True, timeout=timeout_s, check=False)


def stop_worker(proc: subprocess.Popen, *, timeout_s: float = 20.0) -> None:
    """SIGTERM (warm shutdown), then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def running_workers(settings: Settings, count: int = 1, **kwargs: object) -> Iterator[list[subprocess.Popen]]:
    """`count` curation workers for the duration of the block, stopped afterwards."""
    procs = [start_worker(settings, **kwargs) for _ in range(count)]  # type: ignore[arg-type]
    try:
        yield procs
    finally:
        for proc in procs:
            stop_worker(proc)
