"""OpenTelemetry tracing: the tracer provider from config, and W3C trace context carried through gRPC metadata
(SERVER and CLIENT spans) and Celery message headers (PRODUCER and CONSUMER spans), so one image's path through
the workflow is one trace.

Without `setup_tracing` (or with tracing off) nothing is recorded, but an incoming `traceparent` still flows on:
a task started under a traced RPC passes the caller's context to the RPCs it makes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from pony_common.config import Settings

log = logging.getLogger(__name__)

TRACER_NAME = "pony"
# A ProxyTracer: it records through the provider once setup_tracing has installed one.
_tracer = trace.get_tracer(TRACER_NAME)

_lock = threading.Lock()
_provider: TracerProvider | None = None
_exporters: set[int] = set()
_otlp_endpoints: set[str] = set()

# Status codes that mean the server failed (OpenTelemetry's rpc conventions); the rest are the caller's doing.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def setup_tracing(
    settings: Settings, exporter: SpanExporter | None = None, *, service_name: str = "pony"
) -> TracerProvider | None:
    """Installs the process-wide tracer provider when there is somewhere to send spans: the OTLP endpoint of the
    settings (batched, in the background) and/or `exporter` (synchronous: tests, the bench). Idempotent: a second
    call adds only an exporter or endpoint not added before. Returns the provider (None while tracing is off)."""
    global _provider
    with _lock:
        if _provider is None:
            if exporter is None and not settings.otlp_endpoint:
                return None
            current = trace.get_tracer_provider()
            if isinstance(current, TracerProvider):
                _provider = current  # someone installed one already; add to it
            else:
                _provider = TracerProvider(
                    resource=Resource.create({"service.name": service_name}),
                    sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
                )
                trace.set_tracer_provider(_provider)
        if exporter is not None and id(exporter) not in _exporters:
            _provider.add_span_processor(SimpleSpanProcessor(exporter))
            _exporters.add(id(exporter))
        endpoint = settings.otlp_endpoint
        if endpoint and endpoint not in _otlp_endpoints:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
            _otlp_endpoints.add(endpoint)
            log.info("tracing to OTLP", extra={"endpoint": endpoint, "service": service_name})
        return _provider


def setup_tracing_in_children(settings: Settings, *, service_name: str = "pony-worker") -> None:
    """For a prefork Celery worker: each pool process sets tracing up after the fork (an exporter's threads and
    gRPC channel do not survive a fork)."""
    from celery import signals

    def init(**_: Any) -> None:
        setup_tracing(settings, service_name=service_name)

    signals.worker_process_init.connect(init, weak=False, dispatch_uid="pony.tracing.process_init")


def current_trace_id() -> str:
    """The current trace id as 32 hex digits ("" outside a trace)."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


# --- gRPC server ---------------------------------------------------------------------------------------------


def start_server_span(
    service: str, method: str, metadata: Mapping[str, str], request_id: str
) -> tuple[Span, object] | None:
    """A SERVER span for `method` whose parent is the caller's traceparent, made current; returns (span, token),
    or None when tracing is off and the caller sent no trace context (nothing to record or pass on)."""
    if _provider is None and "traceparent" not in metadata:
        return None
    parent = propagate.extract(metadata)
    name = method.lstrip("/")
    service_name, _, short = name.rpartition("/")
    span = _tracer.start_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": service_name,
            "rpc.method": short,
            "pony.service": service,
            "pony.request_id": request_id,
        },
    )
    return span, otel_context.attach(trace.set_span_in_context(span, parent))


def end_server_span(span: Span, token: object, code: grpc.StatusCode) -> None:
    """Records the status code, ends the span and restores the context the call started with."""
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


def record_exception(exc: BaseException) -> None:
    """Adds `exc` to the current span (the server logs it; the trace shows where)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)


# --- gRPC clients --------------------------------------------------------------------------------------------


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def _method_name(method: str | bytes) -> str:
    return (method.decode() if isinstance(method, bytes) else method).lstrip("/")


def _client_span(method: str | bytes) -> Span:
    name = _method_name(method)
    service, _, short = name.rpartition("/")
    return _tracer.start_span(
        name, kind=SpanKind.CLIENT, attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": short}
    )


def _carrier(span: Span) -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def _end_client_span(span: Span, code: grpc.StatusCode | None) -> None:
    if span.is_recording() and code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _sync_done(span: Span) -> Any:
    def done(call: Any) -> None:
        try:
            code = call.code()
        except Exception:
            code = None
        _end_client_span(span, code)

    return done


class ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Blocking channels: a CLIENT span per call, its context sent as `traceparent` metadata."""

    def _start(self, details: grpc.ClientCallDetails) -> tuple[Span | None, grpc.ClientCallDetails]:
        if _provider is None and not trace.get_current_span().get_span_context().is_valid:
            return None, details  # tracing off and no trace to pass on
        span = _client_span(details.method)
        if not span.get_span_context().is_valid:
            return None, details  # no trace to join and tracing off: nothing to send
        meta = [*(details.metadata or ()), *_carrier(span).items()]
        new = details._replace(metadata=meta) if hasattr(details, "_replace") else _CallDetails(details, meta)
        return span, new

    def _call(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        span, details = self._start(details)
        if span is None:
            return continuation(details, request)
        try:
            call = continuation(details, request)
        except BaseException:
            _end_client_span(span, grpc.StatusCode.UNKNOWN)
            raise
        call.add_done_callback(_sync_done(span))
        return call

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return self._call(continuation, details, request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return self._call(continuation, details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return self._call(continuation, details, request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return self._call(continuation, details, request_iterator)


class _AioTracing:
    """asyncio channels: a CLIENT span per call, its context sent as `traceparent` metadata."""

    def _start(self, details: aio.ClientCallDetails) -> tuple[Span | None, aio.ClientCallDetails]:
        if _provider is None and not trace.get_current_span().get_span_context().is_valid:
            return None, details
        span = _client_span(details.method)
        if not span.get_span_context().is_valid:
            return None, details
        meta = aio.Metadata(*(details.metadata or ()), *_carrier(span).items())
        return span, details._replace(metadata=meta)

    async def _unary_response(self, continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
        span, details = self._start(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
            code = await call.code()  # the call has finished: the caller's await returns at once
        except BaseException:
            _end_client_span(span, grpc.StatusCode.UNKNOWN)
            raise
        _end_client_span(span, code)
        return call

    async def _stream_response(self, continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
        span, details = self._start(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
        except BaseException:
            _end_client_span(span, grpc.StatusCode.UNKNOWN)
            raise
        call.add_done_callback(lambda _call: _end_client_span(span, None))
        return call


# grpc.aio files an interceptor under the first of the four kinds it is, so each kind has its own class.
class _AioUnaryUnary(_AioTracing, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await self._unary_response(continuation, details, request)


class _AioUnaryStream(_AioTracing, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await self._stream_response(continuation, details, request)


class _AioStreamUnary(_AioTracing, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await self._unary_response(continuation, details, request_iterator)


class _AioStreamStream(_AioTracing, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await self._stream_response(continuation, details, request_iterator)


def aio_client_interceptors() -> list[aio.ClientInterceptor]:
    """The tracing interceptors of an asyncio channel (one per call kind)."""
    return [_AioUnaryUnary(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()]


# --- Celery --------------------------------------------------------------------------------------------------

_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
_publishing: dict[str, Span] = {}
_running: dict[str, tuple[Span, object]] = {}


def _before_publish(sender: Any = None, headers: MutableMapping[str, Any] | None = None, **kw: Any) -> None:
    if headers is None:
        return
    task_id = str(headers.get("id", ""))
    span = _tracer.start_span(
        f"publish {sender}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "celery",
            "messaging.destination.name": str(kw.get("routing_key") or ""),
            "messaging.message.id": task_id,
        },
    )
    if not span.get_span_context().is_valid:
        return
    for key in _TRACE_HEADERS:
        headers.pop(key, None)  # a signature's copied options must not carry an older context
    propagate.inject(headers, context=trace.set_span_in_context(span))
    if span.is_recording() and task_id:
        _publishing[task_id] = span


def _after_publish(headers: Mapping[str, Any] | None = None, **_: Any) -> None:
    span = _publishing.pop(str((headers or {}).get("id", "")), None)
    if span is not None:
        span.end()


def _task_carrier(task: Any) -> dict[str, str]:
    request = task.request
    carrier = {k: v for k in _TRACE_HEADERS if isinstance(v := getattr(request, k, None), str)}
    if not carrier and isinstance(getattr(request, "headers", None), Mapping):
        carrier = {k: v for k in _TRACE_HEADERS if isinstance(v := request.headers.get(k), str)}
    return carrier


def _task_prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
    if task is None:
        return
    carrier = _task_carrier(task)
    # A task run inline (eager, called directly) continues the current trace.
    parent = propagate.extract(carrier) if carrier else otel_context.get_current()
    delivery = getattr(task.request, "delivery_info", None) or {}
    span = _tracer.start_span(
        f"run {task.name}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "celery",
            "messaging.destination.name": str(delivery.get("routing_key") or ""),
            "messaging.message.id": task_id,
            "celery.task_name": task.name,
            "celery.retries": int(getattr(task.request, "retries", 0) or 0),
        },
    )
    _running[task_id] = (span, otel_context.attach(trace.set_span_in_context(span, parent)))


def _task_postrun(task_id: str = "", state: str | None = None, **_: Any) -> None:
    entry = _running.pop(task_id, None)
    if entry is None:
        return
    span, token = entry
    if span.is_recording() and state:
        span.set_attribute("celery.state", state)
        if state == "FAILURE":
            span.set_status(Status(StatusCode.ERROR, "task failed"))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


def _task_failure(task_id: str = "", exception: BaseException | None = None, **_: Any) -> None:
    entry = _running.get(task_id)
    if entry is not None and exception is not None and entry[0].is_recording():
        entry[0].record_exception(exception)


def _task_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    entry = _running.get(getattr(request, "id", "") or "")
    if entry is not None and entry[0].is_recording():
        entry[0].add_event("retry", {"reason": str(reason)[:500]})


def instrument_celery() -> None:
    """Connects the publish/run signals (once per process; every app and task, publishers and workers alike)."""
    from celery import signals

    for signal, handler in (
        (signals.before_task_publish, _before_publish),
        (signals.after_task_publish, _after_publish),
        (signals.task_prerun, _task_prerun),
        (signals.task_postrun, _task_postrun),
        (signals.task_failure, _task_failure),
        (signals.task_retry, _task_retry),
    ):
        signal.connect(handler, weak=False, dispatch_uid=f"pony.tracing.{handler.__name__}")
