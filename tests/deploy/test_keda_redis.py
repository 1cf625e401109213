"""KEDA on a Redis broker counts every job: jobs published at every priority with the real Celery app land in
kombu's per-priority lists, and what prod-redis's triggers read there (LLEN of each listName, added up by the
scalingModifiers formula) is all of them. The worker's queue-depth metric agrees."""

from __future__ import annotations

import importlib

import pytest
import redis

from pony_common.celery_app import app, configure_app, task_modules
from pony_common.celery_metrics import QueueDepthCollector
from pony_common.config import Settings
from tests.deploy.manifests import QUEUES, find, formula_sum_terms

PRIORITIES = range(10)  # what Celery accepts; kombu clamps the broker priority to 0..9


def route_to(queue: str) -> tuple[str, dict[str, str]]:
    """A registered task routed to `queue` by the app's routes, or (for a queue no task is routed to yet) a
    task name with the queue given as a publisher would."""
    for module in task_modules():
        importlib.import_module(module)
    for task_name, route in (app.conf.task_routes or {}).items():
        if route.get("queue") == queue:
            return task_name, {}
    return f"pony.{queue}.job", {"queue": queue}


@pytest.mark.parametrize("queue", QUEUES)
def test_keda_redis_triggers_count_a_job_at_every_priority(rendered, redis_url, settings: Settings, queue) -> None:
    scaled = find(rendered["prod-redis"], "ScaledObject", f"worker-{queue}")
    triggers = scaled["spec"]["triggers"]
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]

    configure_app(settings.replace(broker_url=redis_url, result_backend=redis_url))
    task_name, options = route_to(queue)
    client = redis.Redis.from_url(redis_url)
    try:
        for priority in PRIORITIES:
            app.send_task(task_name, args=[f"job-{priority}"], priority=priority, **options)

        # What KEDA's redis scaler reads for each trigger (LLEN listName), combined as the formula says.
        read = {t["name"]: client.llen(t["metadata"]["listName"]) for t in triggers}
        assert sum(read[term] for term in formula_sum_terms(formula)) == len(PRIORITIES), read
        # Every list holding a message is one the triggers read, and the plain list alone (the former single
        # trigger) misses the jobs of the higher steps, the default priority 5 among them.
        waiting = {key.decode(): client.llen(key) for key in client.keys("*") if client.type(key) == b"list"}
        assert {k for k, n in waiting.items() if n} <= {t["metadata"]["listName"] for t in triggers}, waiting
        assert client.llen(queue) < len(PRIORITIES)
        # The exported queue depth (pony_celery_queue_depth) sums the same lists.
        assert QueueDepthCollector(app, [queue]).depths() == ({queue: len(PRIORITIES)}, 1.0)
    finally:
        client.close()
        app.close()
