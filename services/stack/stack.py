"""Runs several services in one process on localhost (the embedded default and the tests)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pony_common.config import Settings
from pony_common.grpc.server import RunningServer, start_server
from services.stack.registry import create_service


@dataclass
class Stack:
    """Started servers by service name; `settings` has their real addresses filled in."""

    settings: Settings
    servers: dict[str, RunningServer] = field(default_factory=dict)

    async def wait_ready(self, timeout: float = 300) -> None:
        await asyncio.gather(*(s.wait_ready(timeout) for s in self.servers.values()))

    async def stop(self, grace: float = 2.0) -> None:
        for name in reversed(list(self.servers)):
            await self.servers[name].stop(grace)


async def start_stack(settings: Settings, services: list[str], *, free_ports: bool = False) -> Stack:
    """Starts `services` in order; with free_ports each binds port 0 and the settings learn the port.

    Later services see the addresses of earlier ones (e.g. the sampler finds safety)."""
    stack = Stack(settings)
    for name in services:
        key = name.replace("-", "_")
        port = 0 if free_ports else settings.port(key)
        definition = create_service(name, stack.settings)
        running = await start_server(stack.settings, definition, port=port, host="127.0.0.1")
        stack.servers[name] = running
        stack.settings = stack.settings.replace(**{f"{key}_addr": f"127.0.0.1:{running.port}"})
    return stack
