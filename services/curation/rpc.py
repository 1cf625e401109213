"""The workers' gRPC side: one cached channel per service address, calls with deadlines, and per-item errors
turned into exceptions that say whether a retry can help."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from pony_common.celery_app import RETRYABLE_CODES
from pony_common.config import Settings
from pony_common.grpc.client import channel

T = TypeVar("T")

_lock = threading.Lock()
_channels: dict[str, grpc.Channel] = {}


class ItemFailed(Exception):
    """The service answered, but this image failed for good (a per-item `ItemError` or a non-retryable status)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


def service_channel(settings: Settings, service: str) -> grpc.Channel:
    """The process-wide channel to `service` (its configured address)."""
    address = settings.addr(service)
    with _lock:
        ch = _channels.get(address)
        if ch is None:
            ch = _channels[address] = channel(settings, address)
        return ch


def drop_channel(settings: Settings, service: str) -> None:
    """Forgets the channel so the next call dials afresh (after UNAVAILABLE: no waiting out a reconnect backoff)."""
    address = settings.addr(service)
    with _lock:
        ch = _channels.pop(address, None)
    if ch is not None:
        ch.close()


def call(settings: Settings, service: str, stub_class: type, method: str, request: Any) -> Any:
    """`stub_class(channel).method(request)` with the configured deadline. Retryable statuses propagate as
    grpc.RpcError (the house task retries them with backoff); other statuses become ItemFailed."""
    stub = stub_class(service_channel(settings, service))
    try:
        return getattr(stub, method)(request, timeout=settings.rpc_timeout_s)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code in RETRYABLE_CODES:
            if code == grpc.StatusCode.UNAVAILABLE:
                drop_channel(settings, service)
            raise
        raise ItemFailed(code.name.lower(), exc.details() or code.name) from None  # type: ignore[attr-defined]


def only_result(results: Any, check: Callable[[Any], Any] | None = None) -> Any:
    """The single result of a one-item batch; its ItemError (when set) raised as ItemFailed."""
    if len(results) != 1:
        raise ItemFailed("internal", f"expected 1 result, got {len(results)}")
    result = results[0]
    if result.HasField("error") and (result.error.reason or result.error.message):
        raise ItemFailed(result.error.reason or "item_error", result.error.message)
    if check is not None:
        check(result)
    return result
