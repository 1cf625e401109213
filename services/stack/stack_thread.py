"""A service stack on a background event loop, so synchronous code (Celery workflows, tests, the bench, the demo)
can run the gRPC services on localhost, stop one and bring it back on the same port."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from pony_common.config import Settings
from pony_common.grpc.server import RunningServer
from pony_common.testing import ServerLoop
from services.stack.registry import create_service

T = TypeVar("T")

CURATION_SERVICES = ("captioner", "scorer", "style-tagger", "safety")


class StackThread:
    """`StackThread(settings, names)` starts the services in order (on free ports unless `free_ports=False`: then on
    their configured ports; later services see the addresses of earlier ones, e.g. the sampler finds safety) and
    waits until they are ready; `.settings` then has their addresses. `close()` stops them (use it in a finally)."""

    def __init__(
        self,
        settings: Settings,
        names: Sequence[str] = CURATION_SERVICES,
        *,
        free_ports: bool = True,
        ready_timeout: float = 600,
    ) -> None:
        self.servers = ServerLoop("service-stack")
        self.loop = self.servers.loop
        self.settings = settings
        self.running: dict[str, RunningServer] = {}
        try:
            for name in names:
                key = name.replace("-", "_")
                port = 0 if free_ports else settings.port(key)
                definition = create_service(name, self.settings)
                running = self.servers.start(self.settings, definition, port=port, wait_ready=False)
                self.running[name] = running
                self.settings = self.settings.replace(**{f"{key}_addr": f"127.0.0.1:{running.port}"})
            for running in self.running.values():
                self.run(running.wait_ready(ready_timeout), ready_timeout + 5)
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 300) -> T:
        return self.servers.run(coro, timeout)

    def stop_service(self, name: str) -> None:
        """Stops one service (its port is then closed: clients get UNAVAILABLE)."""
        self.servers.stop(self.running[name])

    def start_service(self, name: str, timeout: float = 300) -> None:
        """Starts a stopped service again on its old port and waits until it is ready."""
        port = self.running[name].port
        definition = create_service(name, self.settings)
        self.running[name] = self.servers.start(self.settings, definition, port=port, ready_timeout=timeout)

    def close(self) -> None:
        self.servers.close()
