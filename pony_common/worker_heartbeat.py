"""The Celery worker's heartbeat file: a consumer bootstep rewrites it every few seconds while the worker is
connected to its broker and consuming, and `check` (what `ponyctl worker --probe` runs) says whether it is fresh."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

# The probe fails once the heartbeat is this many intervals old: one late beat is not a dead worker.
STALE_AFTER_BEATS = 3


def write(path: Path, **info: Any) -> None:
    """Replaces the heartbeat file at once (a reader never sees half a file): the time now plus `info`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"at": time.time(), **info}))
    os.replace(tmp, path)


def clear(path: Path) -> None:
    """Removes the heartbeat: the worker stopped consuming (shutting down, or reconnecting to its broker)."""
    path.unlink(missing_ok=True)


def check(path: Path, max_age_s: float, now: float | None = None) -> str | None:
    """None when the heartbeat at `path` is at most `max_age_s` old; otherwise why not, in one line."""
    try:
        beat = json.loads(path.read_text())
        at = float(beat["at"])
    except FileNotFoundError:
        return f"no heartbeat at {path}: the worker is not connected to its broker (starting, reconnecting or stopped)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable heartbeat at {path}: {exc}"
    age = (time.time() if now is None else now) - at
    if age > max_age_s:
        return f"stale heartbeat at {path}: {age:.1f} s old (limit {max_age_s:g} s); the worker is stuck or gone"
    return None


@functools.cache
def heartbeat_step() -> type:
    """The consumer bootstep class (made on first use: the probe reads the file without importing Celery)."""
    from celery import bootsteps

    class Heartbeat(bootsteps.StartStopStep):
        """Consumer bootstep: from the moment the worker consumes its queues, rewrites the heartbeat file every
        `worker_heartbeat_s` on the worker's own timer (so a stuck event loop stops it), and only while the consumer
        holds a broker connection. Celery stops the consumer's steps when the connection is lost, and this step then
        removes the file until the connection is back. With `--pool solo` a task runs on that loop, so a task longer
        than the probe's limit fails it; the prefork pool (the default) runs tasks in child processes."""

        name = "pony.worker_heartbeat"
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c: Any, **kwargs: Any) -> None:
            self.entry: Any = None
            self.path: Path | None = None
            super().__init__(c, **kwargs)

        def start(self, c: Any) -> None:
            settings = c.app.conf.pony_settings
            path = self.path = Path(settings.worker_heartbeat_file)
            hostname = c.hostname

            def beat() -> None:
                if c.connection is None or not c.connection.connected:
                    return
                try:
                    write(path, hostname=hostname, pid=os.getpid())
                except OSError as exc:
                    log.warning("worker heartbeat not written", extra={"path": str(path), "error": str(exc)})

            beat()
            self.entry = c.timer.call_repeatedly(settings.worker_heartbeat_s, beat)

        def stop(self, c: Any) -> None:
            if self.entry is not None:
                self.entry.cancel()
                self.entry = None
            if self.path is not None:
                clear(self.path)

        shutdown = stop

    return Heartbeat


def install(app: Celery) -> None:
    """Adds the heartbeat step to the workers of `app` (before `worker_main`; again is harmless)."""
    app.steps["consumer"].add(heartbeat_step())
