"""The one Celery app: the table of queues, broker settings from config, and the house task decorator."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

import grpc
from celery import Celery, Task
from kombu import Queue

from pony_common import celery_metrics, tracing
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable

log = logging.getLogger(__name__)

# One queue per step; workers are scaled per queue (KEDA on queue length in the cluster).
QUEUES: dict[str, str] = {
    "caption": "captioner gRPC calls",
    "score": "scorer gRPC calls",
    "style": "style-tagger gRPC calls",
    "safety": "safety gRPC calls",
    "persist": "catalog writes that join the parallel steps",
    "generate": "asynchronous text-to-image jobs for app backends",
    "train": "training run submission and tracking",
    "default": "anything else",
}

# Packages declare the modules holding their tasks as entry points in this group (pyproject.toml); every worker
# imports them all, so this module names none of them.
TASK_ENTRY_POINTS = "pony.tasks"


def task_modules() -> list[str]:
    """The task modules every worker registers, from the installed packages' `pony.tasks` entry points."""
    return sorted(ep.value for ep in entry_points(group=TASK_ENTRY_POINTS))


app = Celery("pony")
_routes: dict[str, dict[str, str]] = {}

# Every task, in publishers and workers alike: trace context in the message headers (PRODUCER/CONSUMER spans) and
# task metrics (latency, queue wait, retries, failures).
tracing.instrument_celery()
celery_metrics.instrument_celery()

F = TypeVar("F", bound=Callable[..., Any])


class RetryableRpcError(DependencyUnavailable):
    """A gRPC call failed with a status worth retrying (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED)."""


RETRYABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, DependencyUnavailable):
        return True
    return isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE_CODES  # type: ignore[attr-defined]


class PonyTask(Task):
    """Base task: a dependency being down is retried with exponential backoff (capped); everything else fails.

    A task registered with `parks=True` waits out an outage for as long as it lasts (no retry budget: it retries
    at least every `retry_max_backoff_s`); the others give up after `max_retries` retries."""

    abstract = True
    max_retries: int | None = 8
    retry_backoff_s = 1.0
    retry_max_backoff_s = 60.0
    parks = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if not is_retryable(exc) or self.request.called_directly:
                raise
            retries = self.request.retries
            countdown = self.retry_countdown(retries)
            # A parked task retries for as long as the outage lasts: say so once, then quietly.
            log.log(
                logging.INFO if self.parks and retries > 0 else logging.WARNING,
                "retrying task",
                extra={"task": self.name, "retries": retries, "countdown": countdown, "error": str(exc)},
            )
            raise self.retry(exc=exc, countdown=countdown, max_retries=self.max_retries) from exc

    def retry_countdown(self, retries: int) -> float:
        """Seconds before retry number `retries + 1`: doubling from `retry_backoff_s`, at most `retry_max_backoff_s`.

        A waiting retry is an unacked message: on Redis it must come due before the visibility timeout, or the
        broker hands it out again while it waits (and every copy retries again)."""
        visibility = float((self.app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
        return min(self.retry_max_backoff_s, visibility / 2, self.retry_backoff_s * (2 ** min(retries, 32)))


def pony_task(
    name: str, queue: str, *, idempotent: bool = True, parks: bool = False, **options: Any
) -> Callable[[F], F]:
    """Registers a task with an explicit name on its queue. Idempotent tasks are acks_late and are
    redelivered when their worker dies; only mark a task idempotent when a re-run is harmless. A task that
    `parks` retries a dependency that is down without limit (the curation stages); the others have a budget
    (`task_max_retries`) and then fail. Pass `ignore_result=True` for a task whose return value nobody reads (the
    curation stages): no result, not even STARTED, is written to the result backend."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; add it to QUEUES")
    _routes[name] = {"queue": queue}
    if parks:
        options.update(parks=True, max_retries=None)

    def decorate(fn: F) -> F:
        return app.task(
            name=name,
            base=PonyTask,
            bind=options.pop("bind", True),
            acks_late=idempotent,
            reject_on_worker_lost=idempotent,
            **options,
        )(fn)

    return decorate


def configure_app(settings: Settings) -> Celery:
    """Points the app at the configured broker and result backend (once per process; again is safe)."""
    # Re-configuring (tests, the demo) must not keep the previous broker pool or result backend.
    app.close()
    app._backend_cache = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    app._local.__dict__.pop("backend", None)
    transport_options: dict[str, Any] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Unacked messages of a dead worker come back after this long.
        visibility = settings.broker_visibility_timeout_s
        transport_options["visibility_timeout"] = visibility
        # Workers sweep for such messages every few seconds (kombu's default sweep is ~100 s apart).
        transport_options["unacked_restore_interval"] = max(1.0, min(10.0, visibility / 2))
        transport_options["unacked_restore_throttle"] = 1
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="default",
        task_routes=_routes,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=False,
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        result_extended=True,
        task_track_started=True,
        include=task_modules(),
        task_queue_max_priority=10,
        task_default_priority=5,
    )
    app.conf.pony_settings = settings
    PonyTask.max_retries = settings.task_max_retries
    PonyTask.retry_backoff_s = settings.task_retry_backoff_s
    PonyTask.retry_max_backoff_s = settings.task_retry_max_backoff_s
    return app


def current_settings() -> Settings:
    """The settings the worker was configured with (tasks read them here, not from the environment)."""
    settings = app.conf.get("pony_settings")
    if settings is None:
        settings = Settings.from_env()
        configure_app(settings)
    return settings


@pony_task("pony.ping", queue="default")
def ping(self: Any, payload: str = "pong") -> dict[str, Any]:
    """Round trip through the broker and a worker (every worker has it)."""
    return {"payload": payload, "worker": self.request.hostname}
