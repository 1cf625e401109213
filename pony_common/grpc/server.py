"""gRPC server bootstrap every service uses: grpc.aio, health (overall, liveness, readiness), reflection (v1 and
v1alpha), the shared interceptor with bearer-token roles (no tokens off loopback: no start), TLS and message
limits from config, and SIGTERM -> NOT_SERVING -> drain -> stop.

Health tells the truth about the model: readiness, the overall status ("") and each service's own name are SERVING
only once the model has loaded. A failed load is tried again with a doubling backoff (PONY_MODEL_LOAD_ATTEMPTS,
PONY_MODEL_LOAD_BACKOFF_S) while liveness stays SERVING; when every try has failed (or a setting is unusable, which
no retry fixes) liveness turns NOT_SERVING, so the kubelet restarts the process."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pony_common.config import ConfigError, Settings
from pony_common.errors import PonyError
from pony_common.grpc import reflection
from pony_common.grpc.auth import Authorizer, Role, require_credentials
from pony_common.grpc.interceptors import ServerInterceptor
from pony_common.metrics import MODEL_LOAD_SECONDS
from pony_common.models.loading import model_load_lock
from pony_common.models.sources import ModelNotFoundError

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_LOAD_BACKOFF_S = 60.0  # the doubling wait between load tries stops growing here


@dataclass
class ServiceDefinition:
    """What a service package hands the bootstrap: its servicers and its model lifecycle.

    `register(server)` adds the servicers; `load()` is the blocking model load, run in a thread after
    the port is bound (and again after a failure), and readiness turns SERVING only when it returns;
    `close()` runs after stop. `roles` maps each full method path to the role it needs (a method missing from it
    needs `admin`).
    """

    name: str
    full_names: list[str]
    register: Callable[[aio.Server], None]
    load: Callable[[], None] | None = None
    close: Callable[[], None] | None = None
    model_id: str = ""
    roles: dict[str, Role] = field(default_factory=dict)


@dataclass
class RunningServer:
    """A started server: its port, its health servicer, and the task loading its model (its tries so far and the
    last try's error)."""

    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    definition: ServiceDefinition
    loading: asyncio.Task | None = None
    health_server: aio.Server | None = None
    health_port: int = 0
    load_attempts: int = 0
    load_error: BaseException | None = None
    _stopping: bool = field(default=False, repr=False)
    _stop_requested: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the model has loaded (re-raising the last load error once no try is left)."""
        if self.loading is not None:
            await asyncio.wait_for(asyncio.shield(self.loading), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING everywhere, then lets in-flight calls finish for `grace` seconds, then stops."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_requested.set()  # a load waiting out its backoff gives up
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.loading is not None and not self.loading.done():
            # The load runs in a thread that cannot be cancelled: wait for it, so no half-loaded model
            # keeps building in the background after the server is gone.
            await asyncio.wait([self.loading], timeout=600)
        if self.loading is not None and self.loading.done() and not self.loading.cancelled():
            self.loading.exception()  # a failed load was logged when it failed: no "never retrieved" at exit
        if self.definition.close is not None:
            self.definition.close()


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not (settings.tls_cert and settings.tls_key):
        return None
    key = Path(settings.tls_key).read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


async def start_server(
    settings: Settings, definition: ServiceDefinition, port: int | None = None, host: str | None = None
) -> RunningServer:
    """Binds (port 0 = a free port), starts serving, and starts loading the model in the background. Off loopback it
    refuses (ConfigError) to start without tokens (PONY_AUTH_TOKENS)."""
    if port is None:
        port = settings.port(definition.name)
    address = f"{host or settings.bind_host}:{port}"
    tokens = require_credentials(settings, definition.name, address)
    limit = settings.max_message_mb * 1024 * 1024
    server = aio.server(
        interceptors=[ServerInterceptor(definition.name, Authorizer(tokens, definition.roles))],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    definition.register(server)
    health_servicer = health.aio.HealthServicer()
    # Set before the server starts: no probe ever sees SERVING for a model that is not loaded.
    for name in ("", READINESS, *definition.full_names):
        await health_servicer.set(name, NOT_SERVING)
    await health_servicer.set(LIVENESS, SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*definition.full_names, health.SERVICE_NAME], server)
    creds = _server_credentials(settings)
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"could not bind {address}")
    await server.start()
    running = RunningServer(server, bound, health_servicer, definition)
    if creds is not None and settings.health_port:
        # Kubelet gRPC probes cannot speak TLS: the same health state on a plaintext, health-only port.
        running.health_server = aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, running.health_server)
        running.health_port = running.health_server.add_insecure_port(
            f"{host or settings.bind_host}:{settings.health_port}"
        )
        await running.health_server.start()
    running.loading = asyncio.create_task(_load(running, settings))
    log.info(
        "serving", extra={"service": definition.name, "port": bound, "tls": creds is not None, "auth": bool(tokens)}
    )
    return running


def _locked_load(load: Callable[[], None]) -> None:
    with model_load_lock:
        load()


async def _load(running: RunningServer, settings: Settings) -> None:
    """Loads the model, trying again after a failure with a doubling backoff; then the server is ready. Once no
    try is left (or the error is a ConfigError) liveness turns NOT_SERVING and the last error is raised."""
    definition = running.definition
    attempts = max(1, settings.model_load_attempts)
    delay = max(0.0, settings.model_load_backoff_s)
    while definition.load is not None:
        running.load_attempts += 1
        started = time.perf_counter()
        try:
            await asyncio.to_thread(_locked_load, definition.load)
        except Exception as exc:
            running.load_error = exc
            extra = {"service": definition.name, "attempt": running.load_attempts, "attempts": attempts}
            # Our own errors say what is wrong and how to fix it in one line; anything else needs its traceback.
            trace = not isinstance(exc, (PonyError, ConfigError, ModelNotFoundError))
            if running.load_attempts >= attempts or isinstance(exc, ConfigError) or running._stopping:
                log.error("model load failed, no try left (liveness NOT_SERVING): %s", exc, exc_info=trace, extra=extra)
                if not running._stopping:
                    await running.health.set(LIVENESS, NOT_SERVING)
                raise
            log.warning("model load failed; trying again in %.3g s: %s", delay, exc, exc_info=trace, extra=extra)
            try:
                await asyncio.wait_for(running._stop_requested.wait(), delay)
            except TimeoutError:
                delay = min(max(delay, 0.05) * 2, MAX_LOAD_BACKOFF_S)
                continue
            raise  # stopped while waiting: the last load error stands
        MODEL_LOAD_SECONDS.labels(definition.name, definition.model_id).set(time.perf_counter() - started)
        running.load_error = None
        break
    if not running._stopping:
        for name in (READINESS, "", *definition.full_names):
            await running.health.set(name, SERVING)
        log.info("ready", extra={"service": definition.name})


async def serve_forever(settings: Settings, definitions: list[ServiceDefinition]) -> None:
    """Runs servers until SIGTERM/SIGINT, then drains them with `settings.shutdown_grace_s`."""
    servers = [await start_server(settings, d) for d in definitions]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    await asyncio.gather(*(s.stop(settings.shutdown_grace_s) for s in servers))
