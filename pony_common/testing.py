"""The one way tests, benches and the demo run gRPC servers from synchronous code: `ServerLoop`, servers on a
background event loop, each bound to a free localhost port unless told otherwise, stopped whatever happens.

    with ServerLoop() as servers:
        running = servers.start(settings, create_service(settings))   # waits until the model is ready
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")

A whole stack of services by name is `services.stack.stack_thread.StackThread`, built on this; Celery workers
as subprocesses are `pony_common.workers.start_worker` / `running_workers`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from pony_common.config import Settings
from pony_common.grpc.server import RunningServer, ServiceDefinition, start_server

T = TypeVar("T")


class ServerLoop:
    """An event loop in a daemon thread running gRPC servers; `close()` (or leaving the `with`) stops them all."""

    def __init__(self, name: str = "servers") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.servers: list[RunningServer] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 300) -> T:
        """Runs `coro` on the loop and returns its result (blocking this thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(
        self,
        settings: Settings,
        definition: ServiceDefinition,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        wait_ready: bool = True,
        ready_timeout: float = 300,
    ) -> RunningServer:
        """Starts `definition` (port 0 = a free port) and, by default, waits until its model has loaded."""
        running = self.run(start_server(settings, definition, port=port, host=host), 60)
        self.servers.append(running)
        if wait_ready:
            self.run(running.wait_ready(ready_timeout), ready_timeout + 5)
        return running

    def stop(self, running: RunningServer, grace: float = 0) -> None:
        """Stops one server (its port is then closed: clients get UNAVAILABLE)."""
        self.run(running.stop(grace), 60 + grace)
        if running in self.servers:
            self.servers.remove(running)

    def close(self) -> None:
        try:
            for running in reversed(list(self.servers)):
                try:
                    self.stop(running)
                except Exception:
                    continue
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> ServerLoop:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class Served:
    """One server started by `serve`: its port, the running server and the loop it runs on."""

    port: int
    running: RunningServer
    loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def serve(settings: Settings, definition: ServiceDefinition, ready_timeout: float = 300) -> Iterator[Served]:
    """One service on a free localhost port for the `with` block, ready (model loaded) when the block starts."""
    with ServerLoop() as servers:
        running = servers.start(settings, definition, ready_timeout=ready_timeout)
        yield Served(running.port, running, servers.loop)
