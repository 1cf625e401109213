"""Client channels to our services: deadlines, retries on UNAVAILABLE, the bearer token of this process's role
(`auth.client_token`: PONY_CLIENT_TOKEN / PONY_CLIENT_TOKEN_FILE / PONY_AUTH_TOKEN), TLS, message limits."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from pony_common.config import Settings
from pony_common.grpc.auth import client_token
from pony_common.tracing import ClientInterceptor, aio_client_interceptors


def _service_config(settings: Settings) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{}],
                    "timeout": f"{settings.rpc_timeout_s:.3f}s",
                    "retryPolicy": {
                        "maxAttempts": max(2, min(settings.rpc_retries, 5)),
                        "initialBackoff": "0.2s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def _options(settings: Settings) -> list[tuple[str, Any]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _service_config(settings)),
    ]


def _credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    if not settings.tls_ca:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(settings.tls_ca).read_bytes())


class _Auth(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback((("authorization", f"Bearer {self.token}"),), None)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token on plaintext channels (call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self.pair = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        meta = [*(details.metadata or ()), self.pair]
        return details._replace(metadata=meta) if hasattr(details, "_replace") else _Details(details, meta)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def channel(settings: Settings, target: str) -> grpc.Channel:
    """A blocking channel to `target` (host:port) or to a service name (`scorer`, `style-tagger`, …).
    Calls send the current trace context (`traceparent`) in CLIENT spans."""
    address = _address(settings, target)
    creds = _credentials(settings)
    token = client_token(settings)
    if creds is not None:
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_Auth(token)))
        return grpc.intercept_channel(
            grpc.secure_channel(address, creds, options=_options(settings)), ClientInterceptor()
        )
    ch = grpc.insecure_channel(address, options=_options(settings))
    if token:
        ch = grpc.intercept_channel(ch, _TokenInterceptor(token))
    return grpc.intercept_channel(ch, ClientInterceptor())


class _AioToken(aio.UnaryUnaryClientInterceptor, aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.pair = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        meta = aio.Metadata(*(details.metadata or ()), self.pair)
        return await continuation(details._replace(metadata=meta), request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        meta = aio.Metadata(*(details.metadata or ()), self.pair)
        return await continuation(details._replace(metadata=meta), request)


class _AioTokenStream(aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.pair = ("authorization", f"Bearer {token}")

    intercept_unary_stream = _AioToken.intercept_unary_stream


def aio_channel(settings: Settings, target: str) -> aio.Channel:
    """An asyncio channel, configured like `channel`."""
    address = _address(settings, target)
    creds = _credentials(settings)
    token = client_token(settings)
    interceptors: list[Any] = aio_client_interceptors()
    if token and creds is None:
        # grpc.aio files an interceptor under its first kind only: the token needs one per kind.
        interceptors += [_AioToken(token), _AioTokenStream(token)]
    if creds is not None:
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_Auth(token)))
        return aio.secure_channel(address, creds, options=_options(settings), interceptors=interceptors)
    return aio.insecure_channel(address, options=_options(settings), interceptors=interceptors)


def _address(settings: Settings, target: str) -> str:
    if ":" in target:
        return target
    return settings.addr(target)


class ServiceClient:
    """The one way to call one of our services: a typed client in `services/<name>/client.py` subclasses this,
    sets `SERVICE` (the config name) and `STUB` (the generated stub class), and adds one method per RPC.

    Blocking calls share one channel per address in the process (`stub`); code on an event loop uses `aio_stub`
    (one channel per loop). Every call gets the configured deadline unless it passes its own. After UNAVAILABLE
    `reset()` drops the shared channel so the next call dials afresh instead of waiting out a reconnect backoff.
    """

    SERVICE: str = ""
    STUB: type | None = None

    _lock = threading.Lock()
    _channels: dict[tuple[str, ...], grpc.Channel] = {}

    def __init__(self, settings: Settings, address: str | None = None) -> None:
        self.settings = settings
        self.address = address if address is not None else settings.addr(self.SERVICE)
        self._aio: dict[int, aio.Channel] = {}

    @property
    def timeout(self) -> float:
        return self.settings.rpc_timeout_s

    def deadline(self, timeout: float | None = None) -> float:
        """A call's deadline in seconds: `timeout` when given, else the configured one."""
        return self.timeout if timeout is None else timeout

    @property
    def _key(self) -> tuple[str, ...]:
        """The shared channel's key: the address and where this client's token comes from."""
        s = self.settings
        return (self.address, s.client_token, s.client_token_file, s.auth_token)

    @property
    def stub(self) -> Any:
        """The blocking stub on the process-wide channel to `address`."""
        key = self._key
        with ServiceClient._lock:
            ch = ServiceClient._channels.get(key)
            if ch is None:
                ch = ServiceClient._channels[key] = channel(self.settings, self.address)
        assert self.STUB is not None, f"{type(self).__name__} sets no STUB"
        return self.STUB(ch)

    @property
    def aio_stub(self) -> Any:
        """The asyncio stub on this client's channel for the running event loop."""
        import asyncio

        loop = id(asyncio.get_running_loop())
        if loop not in self._aio:
            self._aio[loop] = aio_channel(self.settings, self.address)
        assert self.STUB is not None, f"{type(self).__name__} sets no STUB"
        return self.STUB(self._aio[loop])

    def reachable(self, timeout: float) -> bool:
        """Whether the shared channel to `address` connects within `timeout` seconds."""
        self.stub  # noqa: B018 - creates the shared channel
        with ServiceClient._lock:
            ch = ServiceClient._channels[self._key]
        try:
            grpc.channel_ready_future(ch).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def reset(self) -> None:
        """Forgets the shared blocking channel to `address` (after UNAVAILABLE)."""
        with ServiceClient._lock:
            ch = ServiceClient._channels.pop(self._key, None)
        if ch is not None:
            ch.close()

    async def aclose(self) -> None:
        """Closes this client's channel for the running event loop."""
        import asyncio

        ch = self._aio.pop(id(asyncio.get_running_loop()), None)
        if ch is not None:
            await ch.close()
