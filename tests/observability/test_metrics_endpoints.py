"""Prometheus metrics scraped over HTTP: the services' RPC counts and latency under py-grpc-prometheus's names
(grpc_server_started_total, grpc_server_handled_total, grpc_server_handling_seconds), batch sizes, model load time
and version, per-item failures; a `ponyctl worker`'s task latency, queue wait, retries, failures and item failures
(solo and prefork pools); the broker's queue depths."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from pony.v1 import common_pb2, safety_pb2, safety_pb2_grpc, scorer_pb2, scorer_pb2_grpc
from pony_common.celery_app import configure_app
from pony_common.celery_metrics import QueueDepthCollector
from pony_common.config import Settings
from pony_common.grpc.client import channel
from pony_common.metrics import start_metrics_server
from pony_common.workers import start_worker, stop_worker
from services.stack.stack_thread import StackThread
from tests.conftest import free_port
from tests.observability.conftest import matching, scrape, value, wait_for

ROOT = Path(__file__).resolve().parents[2]


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def services(model_settings: Settings) -> Iterator[StackThread]:
    stack = StackThread(model_settings.replace(log_level="WARNING"), ["scorer", "safety"])
    try:
        yield stack
    finally:
        stack.close()


def test_service_metrics_count_rpcs_by_method_and_code_with_batches_models_and_item_failures(
    services: StackThread,
) -> None:
    port = start_metrics_server(free_port(), addr="127.0.0.1")
    before = scrape(port)
    scorer = scorer_pb2_grpc.ScorerStub(channel(services.settings, "scorer"))
    safety = safety_pb2_grpc.SafetyStub(channel(services.settings, "safety"))

    good = [common_pb2.ImageRef(data=png((200, 30, 30))), common_pb2.ImageRef(data=png((20, 30, 200)))]
    resp = scorer.Score(scorer_pb2.ScoreRequest(images=[*good, common_pb2.ImageRef(data=b"not an image")]))
    assert [r.error.reason for r in resp.results] == ["", "", "invalid_image"]
    scorer.Score(scorer_pb2.ScoreRequest(images=good[:1]))
    with pytest.raises(grpc.RpcError) as err:
        scorer.Score(scorer_pb2.ScoreRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    checked = safety.Check(
        safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(image=good[0], tags=["1girl"], item_id="a")])
    )
    assert len(checked.results) == 1

    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # RPC counts and latency under py-grpc-prometheus's names and labels, by service, method, type and code.
    score = {"grpc_type": "UNARY", "grpc_service": "pony.v1.Scorer", "grpc_method": "Score"}
    check = {"grpc_type": "UNARY", "grpc_service": "pony.v1.Safety", "grpc_method": "Check"}
    assert delta("grpc_server_started_total", **score) == 3
    assert delta("grpc_server_handled_total", **score, grpc_code="OK") == 2
    assert delta("grpc_server_handled_total", **score, grpc_code="INVALID_ARGUMENT") == 1
    assert delta("grpc_server_handled_total", **check, grpc_code="OK") == 1
    assert delta("grpc_server_handling_seconds_count", **score) == 3
    assert delta("grpc_server_handling_seconds_sum", **score) > 0
    inf = value(after, "grpc_server_handling_seconds_bucket", **score, le="+Inf")
    assert inf == value(after, "grpc_server_handling_seconds_count", **score)
    # Nothing left in flight: every started call was handled.
    handled = sum(v for _, v in matching(after, "grpc_server_handled_total", **score))
    assert value(after, "grpc_server_started_total", **score) == handled
    # The old names are gone (one convention, not two).
    assert not [name for name, _ in after if name.startswith("pony_rpc_")]
    # Batch sizes: 2 decodable images in the first call, 1 in the second.
    assert delta("pony_batch_size_count", service="scorer", stage="score") == 2
    assert delta("pony_batch_size_sum", service="scorer", stage="score") == 3
    assert delta("pony_batch_size_count", service="safety", stage="check") == 1
    # Per-item failures by reason.
    assert delta("pony_item_failures_total", service="scorer", reason="invalid_image") == 1
    # Model load time and the model/version each service runs.
    for service in ("scorer", "safety"):
        loads = matching(after, "pony_model_load_seconds", service=service)
        assert loads and all(v > 0 for _, v in loads), service
        (info, one), *_ = matching(after, "pony_model_info", service=service)
        assert one == 1 and info["model"] and info["version"], info
    # Health probes are grpc.health.v1.Health's Check, not counted as the safety service's Check.
    health = health_pb2_grpc.HealthStub(channel(services.settings, "safety"))
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    probed = scrape(port)
    assert value(probed, "grpc_server_handled_total", **check, grpc_code="OK") == value(
        after, "grpc_server_handled_total", **check, grpc_code="OK"
    )
    probe = {"grpc_type": "UNARY", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    assert value(probed, "grpc_server_handled_total", **probe, grpc_code="OK") >= 1


def _worker(settings: Settings, pool: str, metrics_port: int, log: Path) -> subprocess.Popen:
    settings = settings.replace(metrics_port=metrics_port, task_retry_backoff_s=0.05, log_level="WARNING")
    include = ["tests.observability.celery_tasks"]
    return start_worker(
        settings, ["default"], name=f"obs-{pool}", pool=pool, log_path=log, include=include, concurrency=1
    )


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_worker_metrics_count_tasks_retries_failures_and_queue_depth(
    pool: str, settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    settings = settings.replace(broker_url=redis_url, result_backend=redis_url)
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    app = configure_app(settings)
    from pony_common.celery_app import ping
    from tests.observability.celery_tasks import boom, flaky

    port = free_port()
    proc = _worker(settings, pool, port, tmp_path / "worker.log")
    try:
        assert ping.delay("a").get(timeout=60)["payload"] == "a"
        assert ping.delay("b").get(timeout=30)["payload"] == "b"
        assert flaky.delay().get(timeout=30)["error"] == "invalid_image: cannot identify image file"
        with pytest.raises(ValueError, match="boom"):
            boom.delay().get(timeout=30, propagate=True)

        def task_count(task: str, state: str) -> float:
            return value(scrape(port), "pony_celery_task_seconds_count", task=task, queue="default", state=state)

        # Task metrics are recorded after the result is stored: wait for the last one.
        wait_for(lambda: task_count("tests.observability.boom", "FAILURE") == 1, 15, "the failure to be counted")
        m = scrape(port)
    finally:
        stop_worker(proc)
        app.close()
    log = (tmp_path / "worker.log").read_text(errors="replace")

    def task(name: str, **labels: str) -> float:
        return value(m, name, queue="default", **labels)

    assert task("pony_celery_task_seconds_count", task="pony.ping", state="SUCCESS") == 2, log
    assert task("pony_celery_task_seconds_count", task="tests.observability.flaky", state="RETRY") == 1
    assert task("pony_celery_task_seconds_count", task="tests.observability.flaky", state="SUCCESS") == 1
    assert task("pony_celery_task_seconds_count", task="tests.observability.boom", state="FAILURE") == 1
    inf = task("pony_celery_task_seconds_bucket", task="pony.ping", state="SUCCESS", le="+Inf")
    assert inf == 2
    assert task("pony_celery_task_retries_total", task="tests.observability.flaky") == 1
    assert task("pony_celery_task_failures_total", task="tests.observability.boom", exception="ValueError") == 1
    assert task("pony_celery_item_failures_total", task="tests.observability.flaky", reason="invalid_image") == 1
    # Queue wait: measured for fresh messages, not for the retry that waited out its countdown.
    assert task("pony_celery_task_queue_wait_seconds_count", task="pony.ping") == 2
    assert task("pony_celery_task_queue_wait_seconds_count", task="tests.observability.flaky") == 1
    assert sum(v for _, v in matching(m, "pony_celery_tasks_active")) == 0
    # The broker collector: depth of the worker's queue, and the broker reachable.
    assert value(m, "pony_celery_queue_depth", queue="default") == 0
    assert value(m, "pony_celery_broker_up") == 1


@pytest.mark.parametrize("kind", ["sqla", "redis", "rabbitmq"])
def test_queue_depth_collector_reads_waiting_messages_from_the_broker(
    kind: str, settings: Settings, request: pytest.FixtureRequest
) -> None:
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        settings = settings.replace(broker_url=url, result_backend=url)
    elif kind == "rabbitmq":
        settings = settings.replace(broker_url=request.getfixturevalue("rabbitmq_url"))
    app = configure_app(settings)
    try:
        for i in range(3):
            app.send_task("tests.observability.nobody_runs_this", args=[i], queue="train")
        collector = QueueDepthCollector(app, ["train", "caption"], cache_s=0)
        depths, up = collector.depths()
        assert up == 1
        assert depths == {"train": 3, "caption": 0}
        families = {f.name: f for f in collector.collect()}
        samples = {s.labels.get("queue"): s.value for s in families["pony_celery_queue_depth"].samples}
        assert samples == {"train": 3, "caption": 0}
        assert families["pony_celery_broker_up"].samples[0].value == 1
    finally:
        app.close()


def test_queue_depth_collector_reports_an_unreachable_broker(settings: Settings) -> None:
    app = configure_app(settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        families = {f.name: f for f in QueueDepthCollector(app, ["train"], cache_s=0).collect()}
    finally:
        app.close()
    assert families["pony_celery_broker_up"].samples[0].value == 0
    assert families["pony_celery_queue_depth"].samples == []
