"""A service stack on a background event loop, so synchronous code (Celery workflows, tests, the bench, the demo)
can run the gRPC services on localhost, stop one and bring it back on the same port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from pony_common.config import Settings
from pony_common.grpc.server import start_server
from services.stack.registry import create_service
from services.stack.stack import Stack, start_stack

T = TypeVar("T")

CURATION_SERVICES = ("captioner", "scorer", "style-tagger", "safety")


class StackThread:
    """`StackThread(settings, names)` starts the services (on free ports unless `free_ports=False`: then on their
    configured ports) and waits until they are ready; `.settings` then has their addresses. `close()` stops them
    (use it in a finally)."""

    def __init__(
        self,
        settings: Settings,
        names: Sequence[str] = CURATION_SERVICES,
        *,
        free_ports: bool = True,
        ready_timeout: float = 600,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="service-stack", daemon=True)
        self._thread.start()
        self.stack: Stack | None = None
        try:
            self.stack = self.run(start_stack(settings, list(names), free_ports=free_ports), ready_timeout)
            self.run(self.stack.wait_ready(ready_timeout), ready_timeout + 5)
        except BaseException:
            self.close()
            raise

    @property
    def settings(self) -> Settings:
        assert self.stack is not None
        return self.stack.settings

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop_service(self, name: str) -> None:
        """Stops one service (its port is then closed: clients get UNAVAILABLE)."""
        assert self.stack is not None
        self.run(self.stack.servers[name].stop(0))

    def start_service(self, name: str, timeout: float = 300) -> None:
        """Starts a stopped service again on its old port and waits until it is ready."""
        assert self.stack is not None
        port = self.stack.servers[name].port
        definition = create_service(name, self.settings)
        running = self.run(start_server(self.settings, definition, port=port, host="127.0.0.1"))
        self.stack.servers[name] = running
        self.run(running.wait_ready(timeout), timeout + 5)

    def close(self) -> None:
        try:
            if self.stack is not None:
                self.run(self.stack.stop(0), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
