"""One real stack for the sampler tests, started once per session: tritonserver (from the nvidia-pytriton wheel)
serving the tiny AuraFlow as `pony_v7`, the safety service, and the sampler with a bearer token."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pony_common.config import Settings
from pony_common.grpc.client import channel
from pony_common.grpc.server import RunningServer, start_server
from services.sampler.model import SamplerModel
from tests.conftest import free_port

TOKEN = "sampler-test-token"
SIZE = 64
STEPS = 4


@dataclass
class LoopThread:
    """An event loop in a background thread, for grpc.aio servers driven from synchronous tests."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @classmethod
    def start(cls) -> LoopThread:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="servers", daemon=True)
        thread.start()
        return cls(loop, thread)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class SamplerStack:
    settings: Settings  # client-side: the sampler's address and the token
    model: SamplerModel
    loops: LoopThread
    servers: dict[str, RunningServer]

    @property
    def addr(self) -> str:
        return self.settings.sampler_addr

    def channel(self, token: str | None = TOKEN) -> grpc.Channel:
        return channel(self.settings.replace(auth_token=token or ""), self.addr)

    def start_sampler(self, settings: Settings, model: SamplerModel | None = None) -> RunningServer:
        """Another sampler server in the same loop (e.g. other safety settings over the same Triton)."""
        from services.sampler.app import create_service

        running = self.loops.run(start_server(settings, create_service(settings, model=model), 0, "127.0.0.1"))
        self.loops.run(running.wait_ready(300), timeout=310)
        return running

    def stop_server(self, running: RunningServer) -> None:
        self.loops.run(running.stop(0))


def stack_settings(state: Path, models: Path) -> Settings:
    return Settings.from_env(
        {},
        state_dir=str(state),
        models_dir=str(models),
        auth_token=TOKEN,
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        sampler_default_width=SIZE,
        sampler_default_height=SIZE,
        sampler_default_steps=STEPS,
        sampler_max_batch_size=4,
        sampler_batch_delay_us=50_000,
        log_json=False,
    )


@pytest.fixture(scope="session")
def sampler_stack(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SamplerStack]:
    from services.safety.app import create_service as create_safety
    from services.sampler.app import create_service as create_sampler

    settings = stack_settings(tmp_path_factory.mktemp("sampler") / "state", tiny_models)
    loops = LoopThread.start()
    servers: dict[str, RunningServer] = {}
    model = SamplerModel(settings)
    try:
        safety = loops.run(start_server(settings, create_safety(settings), 0, "127.0.0.1"))
        servers["safety"] = safety
        settings = settings.replace(safety_addr=f"127.0.0.1:{safety.port}")
        sampler = loops.run(start_server(settings, create_sampler(settings, model=model), 0, "127.0.0.1"))
        servers["sampler"] = sampler

        async def ready() -> None:
            await asyncio.gather(safety.wait_ready(300), sampler.wait_ready(300))

        loops.run(ready(), timeout=310)
        settings = settings.replace(sampler_addr=f"127.0.0.1:{sampler.port}")
        yield SamplerStack(settings, model, loops, servers)
    finally:
        for running in reversed(list(servers.values())):
            loops.run(running.stop(0))
        model.teardown()
        loops.stop()
