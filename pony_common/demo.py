"""The demo: builds the tiny models, starts every service present on localhost, checks health, reports."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pony_common import services
from pony_common.config import Settings
from pony_common.stack import start_stack

TINY_MARKER = ".pony-tiny-models"


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def ensure_tiny_models(settings: Settings) -> Path:
    """Builds the tiny models once; a second run reuses them."""
    out = Path(settings.models_dir)
    if (out / TINY_MARKER).exists():
        say(f"models: reusing tiny models in {out}")
        return out
    from pony_common.models.tiny import build_tiny_models

    t0 = time.perf_counter()
    build_tiny_models(out)
    (out / TINY_MARKER).write_text("built by ponyctl demo\n")
    say(f"models: built tiny models in {out} ({time.perf_counter() - t0:.1f} s)")
    return out


def check_health(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def run_demo(settings: Settings, *, fresh: bool = False) -> int:
    state = Path(settings.state_dir)
    if fresh and state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    say(f"demo: state in {state}")
    ensure_tiny_models(settings)
    return asyncio.run(_run(settings))


async def _run(settings: Settings) -> int:
    present = [s for s in services.available() if s != "sampler"]
    stack = await start_stack(settings, present)
    try:
        await stack.wait_ready()
        for name in present:
            address = stack.settings.addr(name.replace("-", "_"))
            status = await asyncio.to_thread(check_health, address)
            say(f"service {name:<13} {address:<18} readiness={status}")
    finally:
        await stack.stop()
    say("demo: done")
    return 0
