"""Tracing: a server span continues the caller's W3C traceparent and the JSON log line of the call carries its request
id and trace id; one image's curation workflow (real services, a real Celery worker on Redis) is one trace whose
task spans and gRPC client/server spans are linked parent to child."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from PIL import Image
from sqlalchemy import select

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.config import Settings
from pony_common.logs import JsonFormatter
from pony_common.testing import ServerLoop
from services.stack.stack_thread import StackThread
from tests.foundation.echo_service import create_service as echo_service
from tests.observability.conftest import wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def echo(settings: Settings) -> Iterator[int]:
    """The bootstrap's echo service (tests/foundation) on a free port."""
    with ServerLoop() as servers:
        yield servers.start(settings, echo_service(settings)).port


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The interceptor's log lines, formatted as in production (JSON, one per line)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pony_common.grpc.interceptors")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _score(port: int, uri: str) -> tuple[grpc.StatusCode, str]:
    """A call from a plain channel (no tracing of its own) that sends a traceparent; returns (code, request id)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = scorer_pb2_grpc.ScorerStub(ch).Score.with_call
        meta = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
        try:
            _, c = call(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(uri=uri)]), metadata=meta, timeout=10)
        except grpc.RpcError as exc:
            c = exc  # type: ignore[assignment]
    rid = dict(c.trailing_metadata())["x-request-id"]  # the id the server made for the call
    assert "x-request-id" not in dict(c.initial_metadata() or ())  # (sent up front only when the caller named one)
    return c.code(), rid


def test_server_span_continues_the_callers_traceparent_and_the_log_line_carries_both_ids(
    echo: int, spans: InMemorySpanExporter, json_log: io.StringIO
) -> None:
    code, rid = _score(echo, "fine")
    assert code == grpc.StatusCode.OK
    failed, failed_rid = _score(echo, "boom")
    assert failed == grpc.StatusCode.INTERNAL

    wait_for(lambda: len(spans.get_finished_spans()) >= 2, 10, "the server spans")
    ok_span, boom_span = sorted(spans.get_finished_spans(), key=lambda s: s.start_time)
    for span, request_id in ((ok_span, rid), (boom_span, failed_rid)):
        assert span.name == "pony.v1.Scorer/Score" and span.kind == SpanKind.SERVER
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID and span.parent.is_remote
        assert span.attributes["pony.request_id"] == request_id
    assert ok_span.attributes["rpc.grpc.status_code"] == 0 and ok_span.status.status_code == StatusCode.UNSET
    assert boom_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert boom_span.status.status_code == StatusCode.ERROR
    assert [e.name for e in boom_span.events] == ["exception"]

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    rpc_lines = [line for line in lines if line["msg"] == "rpc"]
    assert [(line["request_id"], line["trace_id"], line["code"]) for line in rpc_lines] == [
        (rid, TRACE_ID, "OK"),
        (failed_rid, TRACE_ID, "INTERNAL"),
    ]
    assert all(line["method"] == "/pony.v1.Scorer/Score" and line["level"] == "info" for line in rpc_lines)
    # The crash is logged with the same ids (and its traceback stays in the log, not in the reply).
    (crash,) = [line for line in lines if line["msg"] == "rpc failed"]
    assert crash["request_id"] == failed_rid and crash["trace_id"] == TRACE_ID and "hunter2" in crash["exc"]


# --- one image through the curation workflow ------------------------------------------------------------------

CURATION_SERVICES = ["captioner", "scorer", "style-tagger", "safety"]
STAGES = ("caption", "score", "style", "safety", "persist")
RPC_OF_STAGE = {
    "caption": {"pony.v1.Captioner/Caption"},
    "score": {"pony.v1.Scorer/Score"},
    "style": {"pony.v1.StyleTagger/Tag", "pony.v1.StyleTagger/Palette"},
    "safety": {"pony.v1.Safety/Check"},
}


@pytest.fixture(scope="module")
def curation_services(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[StackThread]:
    state = tmp_path_factory.mktemp("trace-state")
    settings = Settings.from_env({}, state_dir=str(state), models_dir=str(tiny_models), log_level="WARNING")
    stack = StackThread(settings, CURATION_SERVICES)
    try:
        yield stack
    finally:
        stack.close()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.effect_mandelbrot((48, 48), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def test_one_image_through_the_curation_workflow_is_one_linked_trace(
    curation_services: StackThread, redis_url: str, spans: InMemorySpanExporter
) -> None:
    from celery.contrib.testing.worker import start_worker

    from pony_common.blobs import BlobStore
    from pony_common.catalog.db import catalog_for
    from pony_common.catalog.models import ImageRow
    from pony_common.celery_app import configure_app
    from services.curation import tasks as curation
    from services.curation.ingest import store_item
    from services.curation.sources import SourceItem

    settings = curation_services.settings.replace(broker_url=redis_url, result_backend=redis_url)
    catalog = catalog_for(settings.database_url)
    item = SourceItem(uri="mem://trace.png", data=_png(), tags=["1girl", "smile"], characters=[])
    image_id = store_item(settings, catalog, BlobStore(settings.blob_url), item).image_id
    app = configure_app(settings)

    def status() -> str:
        with catalog.session() as s:
            return s.scalar(select(ImageRow.status).where(ImageRow.id == image_id)) or ""

    tracer = trace.get_tracer("tests")
    with start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=20):
        with tracer.start_as_current_span("curate one image") as root:
            curation.workflow(image_id).apply_async()
        wait_for(lambda: status() in ("done", "failed"), 180, "the workflow to finish")
        wait_for(lambda: any(s.name == "run pony.curation.persist" for s in spans.get_finished_spans()), 20, "persist")
    app.close()
    assert status() == "done"

    trace_id = root.get_span_context().trace_id
    finished = spans.get_finished_spans()
    ours = [s for s in finished if s.context.trace_id == trace_id]
    # Every task run and every RPC of this image is in this one trace.
    assert [s for s in finished if s.kind == SpanKind.CONSUMER and s.context.trace_id != trace_id] == []
    by_id = {s.context.span_id: s for s in ours}

    def parent(span: ReadableSpan) -> ReadableSpan | None:
        return by_id.get(span.parent.span_id) if span.parent is not None else None

    def ancestors(span: ReadableSpan) -> list[ReadableSpan]:
        out = []
        while (up := parent(span)) is not None:
            out.append(up)
            span = up
        return out

    # Every span but the root has its parent in the trace, and the chain ends at the root.
    root_id = root.get_span_context().span_id
    for span in ours:
        if span.context.span_id != root_id:
            assert parent(span) is not None, span.name
            assert ancestors(span)[-1].context.span_id == root_id, span.name

    runs = {s.name.removeprefix("run pony.curation."): s for s in ours if s.kind == SpanKind.CONSUMER}
    assert set(runs) == set(STAGES)
    for stage, run in runs.items():
        # A task's span is the child of the PRODUCER span of its publishing.
        producer = parent(run)
        assert producer is not None and producer.kind == SpanKind.PRODUCER
        assert producer.name == f"publish pony.curation.{stage}"
        assert run.attributes["messaging.destination.name"] == stage
    # The batch's chain: caption publishes score, score publishes style and safety, each of those a persist.
    assert parent(parent(runs["caption"])) is not None and parent(parent(runs["caption"])).name == "curate one image"
    assert parent(parent(runs["score"])) is runs["caption"]
    for stage in ("style", "safety"):
        assert parent(parent(runs[stage])) is runs["score"], stage
    persists = [s for s in ours if s.kind == SpanKind.CONSUMER and s.name == "run pony.curation.persist"]
    assert persists and all(parent(parent(p)) in (runs["style"], runs["safety"]) for p in persists)

    # Each stage's gRPC call: a CLIENT span in the task's span, and the service's SERVER span as its child.
    servers = [s for s in ours if s.kind == SpanKind.SERVER]
    for stage, methods in RPC_OF_STAGE.items():
        clients = [s for s in ours if s.kind == SpanKind.CLIENT and parent(s) is runs[stage]]
        assert clients and {c.name for c in clients} <= methods, (stage, [c.name for c in clients])
        for client in clients:
            (server,) = [s for s in servers if parent(s) is client]
            assert server.name == client.name
            assert client.attributes["rpc.grpc.status_code"] == server.attributes["rpc.grpc.status_code"]
        # (style: Tag answers FAILED_PRECONDITION before any cluster set exists, then the task calls Embed.)
        assert max(clients, key=lambda c: c.start_time).attributes["rpc.grpc.status_code"] == 0, stage
    assert {s.name for s in servers} >= {"pony.v1.Captioner/Caption", "pony.v1.Scorer/Score", "pony.v1.Safety/Check"}


def test_a_task_published_inside_an_rpc_continues_the_rpcs_trace(
    settings: Settings, redis_url: str, spans: InMemorySpanExporter
) -> None:
    """What a handler does when it starts a task (the sampler's asynchronous jobs): the task joins the RPC's trace."""
    from celery.contrib.testing.worker import start_worker

    from pony_common import tracing
    from pony_common.celery_app import configure_app, ping

    app = configure_app(settings.replace(broker_url=redis_url, result_backend=redis_url))
    carrier = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    with start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=20):
        span, token = tracing.start_server_span("sampler", "/pony.v1.Sampler/GenerateAsync", carrier, "rid-1")
        try:
            result = ping.delay("traced")
        finally:
            tracing.end_server_span(span, token, grpc.StatusCode.OK)
        assert result.get(timeout=30)["payload"] == "traced"
        wait_for(lambda: any(s.name == "run pony.ping" for s in spans.get_finished_spans()), 10, "the task span")
    app.close()
    by_name = {s.name: s for s in spans.get_finished_spans()}
    names = ("pony.v1.Sampler/GenerateAsync", "publish pony.ping", "run pony.ping")
    server, producer, run = (by_name[n] for n in names)
    assert {f"{s.context.trace_id:032x}" for s in (server, producer, run)} == {TRACE_ID}
    assert producer.parent.span_id == server.context.span_id and producer.kind == SpanKind.PRODUCER
    assert run.parent.span_id == producer.context.span_id and run.kind == SpanKind.CONSUMER
    assert run.attributes["celery.state"] == "SUCCESS"


def test_with_tracing_off_a_propagated_context_still_flows_through_rpcs_and_task_headers(tmp_path: Path) -> None:
    """No provider in the process (the default): nothing is recorded, but an incoming traceparent travels on."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tests.observability.tracing_off_probe", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["provider_installed"] is False
    assert seen["log_trace_ids"] == [TRACE_ID]  # the server's log line: the caller's trace
    assert seen["header"] == f"00-{TRACE_ID}-{PARENT_ID}-01"  # the task message: the same context, passed on
    assert seen["untraced_header"] == ""  # outside any trace nothing is added
