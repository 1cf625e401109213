"""The workers' gRPC side: calls through the services' typed clients, one call per batch of images, with per-item
errors kept per image and the rest turned into exceptions that say whether a retry can help."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


def call(method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
    """`method(request)`, a bound method of a service's typed client (`CaptionerClient(settings).caption`), with
    its configured deadline. Retryable statuses propagate as grpc.RpcError (the house task retries them with
    backoff; after UNAVAILABLE the client's channel is dropped so the retry dials afresh); other statuses become
    ItemFailed."""
    client: ServiceClient = method.__self__  # type: ignore[attr-defined]
    try:
        return method(request) if timeout is None else method(request, timeout=timeout)
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


# The configured deadline (`rpc_timeout_s`) covers a call of this many images; a larger batch gets proportionally more.
DEADLINE_IMAGES = 8

# Whole-call failures that are about the service or the caller, not an image: splitting the batch cannot help.
NOT_ABOUT_AN_IMAGE = frozenset({"failed_precondition", "unimplemented", "permission_denied", "unauthenticated"})


def item_error(result: Any) -> str | None:
    """`reason: message` of a result's ItemError, None when it has none."""
    if result.HasField("error") and (result.error.reason or result.error.message):
        return f"{result.error.reason or 'item_error'}: {result.error.message}"
    return None


@dataclass
class Answers:
    """What a service said about each image of a batch: the result and the response it came in, or the reason it
    failed; `calls` is how many calls it took (1 unless a whole call failed and the batch was split)."""

    results: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    calls: int = 0


def ask_batch(
    method: Callable[[Any], Any],
    build: Callable[[Sequence[str]], Any],
    ids: Sequence[str],
    results: Callable[[Any], Sequence[Any]] = lambda resp: resp.results,
) -> Answers:
    """ONE call `method(build(ids))` for the batch, results in the order of `ids`; an item's ItemError fails that
    image alone. A whole call refused for good (a poison image the service cannot answer per item: INVALID_ARGUMENT
    of the request, INTERNAL) is split in halves and asked again until each bad image fails alone with its reason;
    refusals that are not about an image (NOT_ABOUT_AN_IMAGE) raise ItemFailed, retryable statuses propagate."""
    out = Answers()

    def ask(part: Sequence[str]) -> None:
        out.calls += 1
        client: ServiceClient = method.__self__  # type: ignore[attr-defined]
        try:
            resp = call(method, build(part), client.timeout * max(1.0, len(part) / DEADLINE_IMAGES))
        except ItemFailed as exc:
            if exc.reason in NOT_ABOUT_AN_IMAGE:
                raise
            if len(part) == 1:
                out.failed[part[0]] = str(exc)
                return
            half = len(part) // 2
            ask(part[:half])
            ask(part[half:])
            return
        got = list(results(resp))
        if len(got) != len(part):
            for image_id in part:
                out.failed[image_id] = f"internal: expected {len(part)} results, got {len(got)}"
            return
        for image_id, result in zip(part, got, strict=True):
            echoed = getattr(result, "image_id", "")
            reason = item_error(result)
            if reason is None and echoed and echoed != image_id:
                reason = f"internal: result for {echoed} where {image_id} was asked"
            if reason is None:
                out.results[image_id] = (result, resp)
            else:
                out.failed[image_id] = reason

    if ids:
        ask(list(ids))
    return out
