"""Fixtures of the observability tests: services on a background event loop, one in-memory span exporter for the
test process, and scraping a /metrics endpoint over HTTP."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from pony_common.config import Settings

T = TypeVar("T")


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
