"""Server interceptors: request id and structured logs, bearer-token roles (`auth.py`), metrics, domain error ->
status code (bad input also as `google.rpc.BadRequest` details in the `grpc-status-details-bin` trailer)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from pony_common import errors, tracing
from pony_common.grpc.auth import OPEN_SERVICES, Authorizer
from pony_common.logs import new_request_id, request_id_var
from pony_common.metrics import RPC_HANDLED, RPC_HANDLING_SECONDS, RPC_STARTED

log = logging.getLogger(__name__)


# Where gRPC carries a `google.rpc.Status` with error details (grpcio-status's rpc_status.from_call reads it).
STATUS_DETAILS_KEY = "grpc-status-details-bin"

STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DependencyUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
]


# A status message (and each text in its details trailer) is cut to this many UTF-8 bytes: a message that echoes a
# huge request field must still fit the caller's metadata limit (8 KiB by default, after percent-encoding).
MAX_DETAILS_BYTES = 1024
MAX_FIELD_BYTES = 256


def bounded(text: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, ending in an ellipsis when it was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "\u2026"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the caller-safe message for an exception (bounded in size); unknown errors hide their
    internals."""
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code, bounded(str(exc))
    return grpc.StatusCode.INTERNAL, "internal error (see server logs with the request id)"


def status_details(exc: BaseException, code: grpc.StatusCode, message: str) -> bytes | None:
    """The `grpc-status-details-bin` trailer for an error: a `google.rpc.Status` whose details hold a
    `google.rpc.BadRequest` naming the field for bad input (`rpc_status.from_call` reads it back); None otherwise."""
    if not isinstance(exc, errors.InvalidArgument):
        return None
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=bounded(exc.field, MAX_FIELD_BYTES), description=bounded(exc.message)
    )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status_pb2.Status(code=code.value[0], message=message, details=[detail]).SerializeToString()


def rpc_type(handler: grpc.RpcMethodHandler) -> str:
    """py-grpc-prometheus's grpc_type of a method: UNARY, SERVER_STREAMING, CLIENT_STREAMING or BIDI_STREAMING."""
    kinds = {(False, False): "UNARY", (False, True): "SERVER_STREAMING", (True, False): "CLIENT_STREAMING"}
    return kinds.get((bool(handler.request_streaming), bool(handler.response_streaming)), "BIDI_STREAMING")


class Malformed:
    """What a request deserializer hands the handler for bytes that do not parse (garbage, a truncated message,
    invalid UTF-8 in a string field): the handler answers INVALID_ARGUMENT instead of grpc's UNKNOWN naming a
    Python exception class."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name

    def error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument("request", f"malformed request: not a valid {self.message_name} message")


def parsing(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize` made total: bytes that do not parse become a `Malformed` (never an exception in grpc's core)."""
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "") or "request"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return Malformed(name)

    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise request.error()
    return request


async def _parsed_stream(request_iter: Any) -> AsyncIterator[Any]:
    async for request in request_iter:
        yield _parsed(request)


# A caller's own request id is echoed back (headers, trailers, logs) only when it is short and plain.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(meta: dict[str, str]) -> str:
    given = meta.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else new_request_id()


def _unread(data: bytes) -> None:
    """The request deserializer of a call refused before it runs."""
    return None


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    meta: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():
        if isinstance(value, str):
            key = key.lower()
            # Repeated `authorization` headers are one ambiguous credential (joined as HTTP joins repeats), which no
            # token matches: never whichever of them happens to come last.
            meta[key] = f"{meta[key]}, {value}" if key == "authorization" and key in meta else value
    return meta


class ServerInterceptor(aio.ServerInterceptor):
    """One interceptor for the cross-cutting concerns, so their order is explicit and fixed."""

    def __init__(self, service: str, auth: Authorizer | None = None) -> None:
        self.service = service
        self.auth = auth

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        meta = _metadata(details)
        is_open = method.startswith(OPEN_SERVICES)
        rid = _request_id(meta)
        denied = self.auth.check(method, meta) if self.auth is not None else None
        if denied is not None and hasattr(handler, "_replace"):
            handler = handler._replace(request_deserializer=_unread)  # a refused caller's bytes are never parsed
        return _wrap(handler, self.service, method, rid, denied, quiet=is_open, meta=meta)


def _wrap(
    handler: grpc.RpcMethodHandler,
    service: str,
    method: str,
    rid: str,
    denied: tuple[grpc.StatusCode, str] | None,
    quiet: bool,
    meta: dict[str, str] | None = None,
) -> grpc.RpcMethodHandler:
    # Metric labels: /pony.v1.Safety/Check -> (pony.v1.Safety, Check); health is grpc.health.v1.Health's Check.
    grpc_service, _, grpc_method = method.lstrip("/").rpartition("/")
    labels = (rpc_type(handler), grpc_service, grpc_method)
    named = "x-request-id" in (meta or {})

    async def begin(context: aio.ServicerContext) -> tuple[float, Any]:
        request_id_var.set(rid)
        # The caller finds the request id in the trailers (free: they go with the status); one that named the
        # request itself also gets it back up front (initial metadata on its own is an extra send per call).
        context.set_trailing_metadata((("x-request-id", rid),))
        if named:
            await context.send_initial_metadata((("x-request-id", rid),))
        started = time.perf_counter()
        RPC_STARTED.labels(*labels).inc()
        if denied:
            RPC_HANDLED.labels(*labels, denied[0].name).inc()
            RPC_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - started)
            await context.abort(*denied)
        # The handler runs in a SERVER span continuing the caller's traceparent (health probes stay untraced).
        span = None if quiet else tracing.start_server_span(service, method, meta or {}, rid)
        return started, span

    async def fail(context: aio.ServicerContext, exc: BaseException) -> None:
        code, message = status_for(exc)  # bounded: a huge echoed field never reaches the caller's metadata
        if code is grpc.StatusCode.INTERNAL:
            log.exception("rpc failed", extra={"method": method})
            tracing.record_exception(exc)
        else:
            log.info("rpc error", extra={"method": method, "code": code.name, "error": message})
        details = status_details(exc, code, message)
        if details is not None:
            context.set_trailing_metadata((("x-request-id", rid), (STATUS_DETAILS_KEY, details)))
        context.set_code(code)
        context.set_details(message)

    def finish(context: aio.ServicerContext, begun: tuple[float, Any]) -> None:
        started, span = begun
        code = context.code() or grpc.StatusCode.OK
        if isinstance(code, int):
            code = grpc.StatusCode.OK if code == 0 else grpc.StatusCode.UNKNOWN
        elapsed = time.perf_counter() - started
        RPC_HANDLED.labels(*labels, code.name).inc()
        RPC_HANDLING_SECONDS.labels(*labels).observe(elapsed)
        if not quiet:
            log.info("rpc", extra={"method": method, "code": code.name, "ms": round(elapsed * 1000, 2)})
        if span is not None:
            tracing.end_server_span(*span, code)

    def guard(exc: BaseException) -> bool:
        # aio.AbortError is how context.abort() unwinds; it must pass through untouched.
        # GeneratorExit: the client stopped reading a stream (cancelled it); that is not a server error.
        passthrough = (aio.AbortError, GeneratorExit, KeyboardInterrupt, SystemExit)
        return not isinstance(exc, passthrough) and not _is_cancel(exc)

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
            started = await begin(context)
            try:
                return await _maybe_await(inner_uu(_parsed(request), context))
            except BaseException as exc:
                if not guard(exc):
                    raise
                await fail(context, exc)
                return None
            finally:
                finish(context, started)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, parsing(handler.request_deserializer), handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: aio.ServicerContext) -> Any:
            started = await begin(context)
            try:
                async for item in _items(inner_us(_parsed(request), context)):
                    yield item
            except BaseException as exc:
                if not guard(exc):
                    raise
                await fail(context, exc)
            finally:
                finish(context, started)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, parsing(handler.request_deserializer), handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(request_iter: Any, context: aio.ServicerContext) -> Any:
            started = await begin(context)
            try:
                return await _maybe_await(inner_su(_parsed_stream(request_iter), context))
            except BaseException as exc:
                if not guard(exc):
                    raise
                await fail(context, exc)
                return None
            finally:
                finish(context, started)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, parsing(handler.request_deserializer), handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(request_iter: Any, context: aio.ServicerContext) -> Any:
        started = await begin(context)
        try:
            async for item in _items(inner_ss(_parsed_stream(request_iter), context)):
                yield item
        except BaseException as exc:
            if not guard(exc):
                raise
            await fail(context, exc)
        finally:
            finish(context, started)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, parsing(handler.request_deserializer), handler.response_serializer
    )


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)


async def _items(result: Any) -> AsyncIterator[Any]:
    """Streams from an async generator handler, or awaits a coroutine handler that writes with context.write()."""
    if inspect.isawaitable(result):
        await result
        return
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
        return
    for item in result:
        yield item


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
