"""gRPC server bootstrap every service uses: grpc.aio, health (overall, liveness, readiness), reflection,
the shared interceptor, TLS and message limits from config, and SIGTERM -> NOT_SERVING -> drain -> stop."""

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
from grpc_reflection.v1alpha import reflection

from pony_common.config import Settings
from pony_common.grpc.interceptors import ServerInterceptor
from pony_common.metrics import MODEL_LOAD_SECONDS
from pony_common.models.loading import model_load_lock

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServiceDefinition:
    """What a service package hands the bootstrap: its servicers and its model lifecycle.

    `register(server)` adds the servicers; `load()` is the blocking model load, run in a thread after
    the port is bound, and readiness turns SERVING only when it returns; `close()` runs after stop.
    """

    name: str
    full_names: list[str]
    register: Callable[[aio.Server], None]
    load: Callable[[], None] | None = None
    close: Callable[[], None] | None = None
    model_id: str = ""


@dataclass
class RunningServer:
    """A started server: its port, its health servicer, and the task loading its model."""

    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    definition: ServiceDefinition
    loading: asyncio.Task | None = None
    health_server: aio.Server | None = None
    health_port: int = 0
    _stopping: bool = field(default=False, repr=False)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the model has loaded (re-raising its load error)."""
        if self.loading is not None:
            await asyncio.wait_for(asyncio.shield(self.loading), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING everywhere, then lets in-flight calls finish for `grace` seconds, then stops."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.loading is not None and not self.loading.done():
            # The load runs in a thread that cannot be cancelled: wait for it, so no half-loaded model
            # keeps building in the background after the server is gone.
            await asyncio.wait([self.loading], timeout=600)
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
    """Binds (port 0 = a free port), starts serving, and starts loading the model in the background."""
    limit = settings.max_message_mb * 1024 * 1024
    server = aio.server(
        interceptors=[ServerInterceptor(definition.name, settings.auth_token)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    definition.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*definition.full_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    if port is None:
        port = settings.port(definition.name)
    address = f"{host or settings.bind_host}:{port}"
    creds = _server_credentials(settings)
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"could not bind {address}")
    await server.start()
    for name in ("", LIVENESS, *definition.full_names):
        await health_servicer.set(name, SERVING)
    running = RunningServer(server, bound, health_servicer, definition)
    if creds is not None and settings.health_port:
        # Kubelet gRPC probes cannot speak TLS: the same health state on a plaintext, health-only port.
        running.health_server = aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, running.health_server)
        running.health_port = running.health_server.add_insecure_port(
            f"{host or settings.bind_host}:{settings.health_port}"
        )
        await running.health_server.start()
    await health_servicer.set(READINESS, NOT_SERVING)
    running.loading = asyncio.create_task(_load(running))
    log.info("serving", extra={"service": definition.name, "port": bound, "tls": creds is not None})
    return running


def _locked_load(load: Callable[[], None]) -> None:
    with model_load_lock:
        load()


async def _load(running: RunningServer) -> None:
    definition = running.definition
    if definition.load is not None:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(_locked_load, definition.load)
        except Exception:
            log.exception("model load failed", extra={"service": definition.name})
            for name in definition.full_names:
                await running.health.set(name, NOT_SERVING)
            raise
        MODEL_LOAD_SECONDS.labels(definition.name, definition.model_id).set(time.perf_counter() - started)
    if not running._stopping:
        await running.health.set(READINESS, SERVING)
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
