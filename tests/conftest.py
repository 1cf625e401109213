"""Shared fixtures: real PostgreSQL/Redis/RabbitMQ (skip when down, fail under PONY_REQUIRE_SERVICES=1),
tiny models built once per session, per-test settings in a temporary state folder, free ports."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pony_common.config import Settings

# The session-wide sampler stack (one tritonserver for tests/sampler, tests/security and the rest).
pytest_plugins = ["tests.sampler_stack"]

ROOT = Path(__file__).resolve().parents[1]
# The project's reference data: ../shared/ref beside the checkout (CI clones main next to shared/).
SHARED_REF = next(
    (p for p in (ROOT.parent / "shared" / "ref", Path("/work/shared/ref")) if p.is_dir()),
    ROOT.parent / "shared" / "ref",
)
LAION_HEAD_PATH = SHARED_REF / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"

PG_ADMIN_URL = os.environ.get("PONY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST = ("127.0.0.1", 6379)
RABBIT_URL = os.environ.get("PONY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require(service: str, host: str, port: int) -> None:
    """Skips the test when `service` is down, unless PONY_REQUIRE_SERVICES=1 (CI), where it fails."""
    if _reachable(host, port):
        return
    message = f"{service} is not reachable on {host}:{port}"
    if os.environ.get("PONY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (PONY_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_postgres_database(prefix: str = "pony_test") -> Iterator[str]:
    """A new, empty PostgreSQL database for the `with` block, dropped afterwards (skips/fails when PG is down)."""
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, flushed before and after."""
    require("Redis", *REDIS_HOST)
    import redis

    # One database per test process, so concurrent test runs on one machine do not flush each other's queues.
    db = int(os.environ.get("PONY_TEST_REDIS_DB", str(1 + os.getpid() % 15)))
    client = redis.Redis(host=REDIS_HOST[0], port=REDIS_HOST[1], db=db)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST[0]}:{REDIS_HOST[1]}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """RabbitMQ (guest/guest); our queues are purged before and after the test."""
    require("RabbitMQ", "127.0.0.1", 5672)
    from kombu import Connection

    from pony_common.celery_app import QUEUES

    def purge() -> None:
        with Connection(RABBIT_URL) as conn:
            channel = conn.channel()
            for q in QUEUES:
                try:
                    channel.queue_purge(q)
                except Exception:
                    channel = conn.channel()  # the queue does not exist yet

    purge()
    try:
        yield RABBIT_URL
    finally:
        purge()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, built once per test session (what `ponyctl models tiny` writes)."""
    from services.stack.tiny import build_tiny_models

    out = tmp_path_factory.mktemp("models")
    build_tiny_models(out)
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: a fresh state folder (SQLite catalog, sqla broker, local blobs)."""
    return Settings.from_env({}, state_dir=str(tmp_path / "state"))


@pytest.fixture
def model_settings(settings: Settings, tiny_models: Path) -> Settings:
    """Per-test settings whose models are the session's tiny models."""
    return settings.replace(models_dir=str(tiny_models))
