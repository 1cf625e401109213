"""The hostile-input battery's targets, each a real running service on loopback: captioner, scorer, style tagger,
safety and trainer over one PostgreSQL catalog with role tokens (admin, worker, generate), and the sampler through
the sampler tests' session stack (its real tritonserver and safety service, the sampler's token)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pony_common.config import Settings
from services.stack.stack_thread import StackThread
from tests.conftest import fresh_postgres_database
from tests.sampler_stack import TOKEN as SAMPLER_TOKEN
from tests.sampler_stack import SamplerStack
from tests.trainer.conftest import make_manifest

ADMIN_TOKEN = "battery-admin-token"
WORKER_TOKEN = "battery-worker-token"
GENERATE_TOKEN = "battery-generate-token"
STACK_SERVICES = ("captioner", "scorer", "style-tagger", "safety", "trainer")
# Budgets small enough for a test to pass them with a few small images (the defaults exceed the message limit).
REQUEST_MAX_PIXELS = 1_000_000
REQUEST_MAX_IMAGE_BYTES = 2_000_000


@dataclass
class Target:
    """One service under test: where it listens and the token its callers send unless a case says otherwise."""

    address: str
    token: str
    channel: grpc.Channel


@dataclass
class Battery:
    targets: dict[str, Target]
    state_dir: Path
    manifest: Path  # a real export manifest inside the trainer's allowed roots (its runs folder)


@pytest.fixture(scope="session")
def battery_postgres_url() -> Iterator[str]:
    """A PostgreSQL database of the battery's own for the whole session (NUL bytes break PostgreSQL, not SQLite)."""
    with fresh_postgres_database("pony_battery") as url:
        yield url


@pytest.fixture(scope="session")
def service_stack(
    tiny_models: Path, battery_postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackThread]:
    state = tmp_path_factory.mktemp("security") / "state"
    settings = Settings.from_env(
        {},
        state_dir=str(state),
        models_dir=str(tiny_models),
        database_url=battery_postgres_url,
        auth_tokens=f"admin:{ADMIN_TOKEN},worker:{WORKER_TOKEN},generate:{GENERATE_TOKEN}",
        request_max_pixels=REQUEST_MAX_PIXELS,
        request_max_image_bytes=REQUEST_MAX_IMAGE_BYTES,
        log_json=False,
        log_level="WARNING",
    )
    stack = StackThread(settings, STACK_SERVICES)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="session")
def battery(service_stack: StackThread, sampler_stack: SamplerStack) -> Iterator[Battery]:
    channels: list[grpc.Channel] = []

    def target(address: str, token: str) -> Target:
        channels.append(grpc.insecure_channel(address))
        return Target(address, token, channels[-1])

    targets = {
        name: target(f"127.0.0.1:{running.port}", ADMIN_TOKEN) for name, running in service_stack.running.items()
    }
    targets["sampler"] = target(sampler_stack.addr, SAMPLER_TOKEN)
    state = Path(service_stack.settings.state_dir)
    manifest = make_manifest(Path(service_stack.settings.trainer.output_dir or state / "runs") / "battery-data")
    try:
        yield Battery(targets, state, manifest)
    finally:
        for ch in channels:
            ch.close()
