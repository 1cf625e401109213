"""Fixtures of the observability tests: services on a background event loop, one in-memory span exporter for the
test process, and scraping a /metrics endpoint over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from pony_common.config import Settings
from services.stack.stack import Stack, start_stack

T = TypeVar("T")


class ServicesThread:
    """`start_stack` on an event loop in a thread, so blocking clients (tests, Celery tasks) can call it."""

    def __init__(self, settings: Settings, names: Sequence[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="services", daemon=True)
        self.thread.start()
        self.stack: Stack | None = None
        try:
            self.stack = self.run(start_stack(settings, list(names), free_ports=True))
            self.run(self.stack.wait_ready(300), 310)
        except BaseException:
            self.close()
            raise

    @property
    def settings(self) -> Settings:
        assert self.stack is not None
        return self.stack.settings

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            if self.stack is not None:
                self.run(self.stack.stop(0), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """The test process's tracer provider records into this exporter (tracing is global to a process)."""
    from pony_common.tracing import setup_tracing

    exporter = InMemorySpanExporter()
    setup_tracing(Settings.from_env({}), exporter, service_name="pony-tests")
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    span_exporter.clear()
    yield span_exporter
    span_exporter.clear()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics -> {(sample name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def matching(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return [(dict(lab), v) for (n, lab), v in samples.items() if n == name and want <= lab]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
