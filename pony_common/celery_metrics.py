"""Celery metrics: task latency, queue wait, retries, failures and per-item failures from the task signals, and the
broker's queue depths from a collector; `serve_worker_metrics` exports them on PONY_METRICS_PORT."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from celery import Celery
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pony_common.config import Settings
from pony_common.metrics import start_metrics_server

log = logging.getLogger(__name__)

_TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

TASK_SECONDS = Histogram(
    "pony_celery_task_seconds",
    "time a task ran in a worker, by its final state (SUCCESS, FAILURE, RETRY)",
    ("task", "queue", "state"),
    buckets=_TASK_BUCKETS,
)
TASK_QUEUE_WAIT = Histogram(
    "pony_celery_task_queue_wait_seconds",
    "time from publishing a task to a worker starting it (tasks without a countdown or eta)",
    ("task", "queue"),
    buckets=_TASK_BUCKETS,
)
TASK_RETRIES = Counter("pony_celery_task_retries", "task retries scheduled", ("task", "queue"))
TASK_FAILURES = Counter(
    "pony_celery_task_failures", "tasks that raised (after their retries)", ("task", "queue", "exception")
)
TASK_ITEM_FAILURES = Counter(
    "pony_celery_item_failures",
    "tasks that finished but recorded their item as failed (a result {'status': 'failed', 'error': 'reason: ...'})",
    ("task", "queue", "reason"),
)
TASKS_ACTIVE = Gauge("pony_celery_tasks_active", "tasks running now", ("task", "queue"), multiprocess_mode="livesum")

QUEUE_DEPTH = "pony_celery_queue_depth"
BROKER_UP = "pony_celery_broker_up"
PUBLISHED_AT = "pony_published_at"  # message header: publish time (seconds since the epoch)

_started: dict[str, tuple[float, str, str]] = {}
_multiprocess_dir = ""


def _queue(task: Any) -> str:
    delivery = getattr(task.request, "delivery_info", None) or {}
    queue = delivery.get("routing_key") or ""
    if not queue:
        routes = task.app.conf.task_routes or {}
        route = routes.get(task.name) if isinstance(routes, Mapping) else None
        queue = (route or {}).get("queue") or task.app.conf.task_default_queue or "default"
    return str(queue)


def _reason(error: Any) -> str:
    """`invalid_image: …` -> `invalid_image` (bounded, for a label)."""
    head = str(error or "unknown").split(":", 1)[0].strip()
    return head[:48] or "unknown"


def _before_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers[PUBLISHED_AT] = time.time()


def _task_prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
    if task is None:
        return
    queue = _queue(task)
    request = task.request
    published = getattr(request, PUBLISHED_AT, None)
    if isinstance(published, (int, float)) and not getattr(request, "eta", None):
        TASK_QUEUE_WAIT.labels(task.name, queue).observe(max(0.0, time.time() - published))
    TASKS_ACTIVE.labels(task.name, queue).inc()
    _started[task_id] = (time.perf_counter(), task.name, queue)


def _task_postrun(task_id: str = "", retval: Any = None, state: str | None = None, **_: Any) -> None:
    entry = _started.pop(task_id, None)
    if entry is None:
        return
    started, name, queue = entry
    TASKS_ACTIVE.labels(name, queue).dec()
    TASK_SECONDS.labels(name, queue, state or "UNKNOWN").observe(time.perf_counter() - started)
    if state == "SUCCESS" and isinstance(retval, Mapping) and retval.get("status") == "failed":
        TASK_ITEM_FAILURES.labels(name, queue, _reason(retval.get("error"))).inc()


def _task_failure(sender: Any = None, task_id: str = "", exception: BaseException | None = None, **_: Any) -> None:
    if sender is not None:
        TASK_FAILURES.labels(sender.name, _queue(sender), type(exception).__name__).inc()


def _task_retry(sender: Any = None, **_: Any) -> None:
    if sender is not None:
        TASK_RETRIES.labels(sender.name, _queue(sender)).inc()


def _process_shutdown(pid: int | None = None, **_: Any) -> None:
    if _multiprocess_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), _multiprocess_dir)


def instrument_celery() -> None:
    """Connects the task signals (once per process; every task of every app)."""
    from celery import signals

    for signal, handler in (
        (signals.before_task_publish, _before_publish),
        (signals.task_prerun, _task_prerun),
        (signals.task_postrun, _task_postrun),
        (signals.task_failure, _task_failure),
        (signals.task_retry, _task_retry),
        (signals.worker_process_shutdown, _process_shutdown),
    ):
        signal.connect(handler, weak=False, dispatch_uid=f"pony.celery_metrics.{handler.__name__}")


class QueueDepthCollector(Collector):
    """Messages waiting per queue, asked of the broker at scrape time (at most every `cache_s` seconds):
    `queue_declare(passive=True)` gives the count on AMQP and the transport's size on Redis and SQL."""

    def __init__(self, app: Celery, queues: Sequence[str], cache_s: float = 5.0) -> None:
        self.app = app
        self.queues = list(queues)
        self.cache_s = cache_s
        self._at = -1e9
        self._depths: dict[str, int] = {}
        self._up = 0.0

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families({}, 0.0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if time.monotonic() - self._at >= self.cache_s:
            self._depths, self._up = self.depths()
            self._at = time.monotonic()
        yield from self._families(self._depths, self._up)

    def _families(self, depths: Mapping[str, int], up: float) -> list[GaugeMetricFamily]:
        depth = GaugeMetricFamily(QUEUE_DEPTH, "messages waiting in the broker per queue", labels=["queue"])
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        return [depth, GaugeMetricFamily(BROKER_UP, "1 when the last queue-depth query reached the broker", up)]

    def depths(self) -> tuple[dict[str, int], float]:
        """Asks the broker now; ({queue: waiting}, 1.0), or ({}, 0.0) when it cannot be reached."""
        out: dict[str, int] = {}
        try:
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1)
                channel = conn.channel()
                for queue in self.queues:
                    try:
                        out[queue] = int(channel.queue_declare(queue, passive=True).message_count)
                    except conn.channel_errors:
                        # Not declared yet (AMQP closes the channel then), or an empty Redis list: none waiting.
                        out[queue] = 0
                        channel = conn.channel()
        except Exception as exc:
            log.warning("queue depth: broker unreachable", extra={"error": str(exc)})
            return {}, 0.0
        return out, 1.0


def serve_worker_metrics(
    settings: Settings, app: Celery, queues: Sequence[str], *, multiprocess: bool = False
) -> CollectorRegistry | None:
    """Serves the worker's metrics and the depth of `queues` on `settings.metrics_port` (0 = off). With
    `multiprocess` (a prefork pool, called before the fork) the pool processes write their metrics to files in a
    fresh folder, and the endpoint merges them (prometheus_client's multiprocess mode)."""
    global _multiprocess_dir
    if not settings.metrics_port:
        return None
    registry = REGISTRY
    if multiprocess:
        from prometheus_client import multiprocess as mp
        from prometheus_client import values

        _multiprocess_dir = tempfile.mkdtemp(prefix="pony-metrics-")
        # prometheus_client reads the folder from the environment; metric children made from now on (in the pool
        # processes: every task metric) write there.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _multiprocess_dir
        values.ValueClass = values.MultiProcessValue()
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry, _multiprocess_dir)
    registry.register(QueueDepthCollector(app, queues))
    start_metrics_server(settings.metrics_port, registry=registry)
    return registry
