"""The workers' gRPC side: calls through the services' typed clients, with per-item errors turned into
exceptions that say whether a retry can help."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from pony_common.celery_app import RETRYABLE_CODES
from pony_common.grpc.client import ServiceClient

T = TypeVar("T")


class ItemFailed(Exception):
    """The service answered, but this image failed for good (a per-item `ItemError` or a non-retryable status)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


def call(method: Callable[[Any], T], request: Any) -> T:
    """`method(request)`, a bound method of a service's typed client (`CaptionerClient(settings).caption`), with
    its configured deadline. Retryable statuses propagate as grpc.RpcError (the house task retries them with
    backoff; after UNAVAILABLE the client's channel is dropped so the retry dials afresh); other statuses become
    ItemFailed."""
    client: ServiceClient = method.__self__  # type: ignore[attr-defined]
    try:
        return method(request)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code in RETRYABLE_CODES:
            if code == grpc.StatusCode.UNAVAILABLE:
                client.reset()
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
