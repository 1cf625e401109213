"""Prometheus metrics every process exports: RPC counts and latency (py-grpc-prometheus names), batches, models,
failures."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# RPC metrics under py-grpc-prometheus's names and labels (the same as go- and java-grpc-prometheus): grpc_type is
# UNARY | SERVER_STREAMING | CLIENT_STREAMING | BIDI_STREAMING, grpc_service the full service name (pony.v1.Scorer,
# grpc.health.v1.Health), grpc_method the method (Score), grpc_code the status code's name (OK, INVALID_ARGUMENT).
# Calls in flight are grpc_server_started_total - grpc_server_handled_total.
_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
RPC_STARTED = Counter("grpc_server_started_total", "Total number of RPCs started on the server.", _RPC_LABELS)
RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    (*_RPC_LABELS, "grpc_code"),
)
RPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    _RPC_LABELS,
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "pony_batch_size",
    "items per model batch",
    ("service", "stage"),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
# Model servers merge concurrent requests into model batches (pony_common/batching.py, like Triton's dynamic batcher).
MODEL_BATCH_SIZE = Histogram(
    "pony_model_batch_size",
    "items per model batch a dynamic batcher ran (merged from concurrent requests)",
    ("model",),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MODEL_REQUESTS_MERGED = Counter(
    "pony_model_requests_merged",
    "requests whose items ran in a model batch together with another request's items",
    ("model",),
)
CLIP_FORWARD_IMAGES = Counter(
    "pony_clip_forward_images", "images that went through a CLIP image tower forward pass", ("model",)
)
MODEL_LOAD_SECONDS = Gauge("pony_model_load_seconds", "time the last model load took", ("service", "model"))
MODEL_INFO = Info("pony_model", "the model and version a service runs", ("service",))
ITEM_FAILURES = Counter("pony_item_failures", "per-item failures inside a batch call", ("service", "reason"))

# The sampler fills these per generation request from Triton: per-request timings the model returns with its
# final response, or the deltas of Triton's statistics API (queue.ns, compute_infer.ns) for the model.
_GENERATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
SAMPLER_QUEUE_WAIT = Histogram(
    "pony_sampler_queue_wait_seconds",
    "time a generation request waited in Triton's scheduler queue before the model took it",
    ("model",),
    buckets=_GENERATION_BUCKETS,
)
SAMPLER_COMPUTE = Histogram(
    "pony_sampler_compute_seconds",
    "time the model spent computing a generation request (its batch)",
    ("model",),
    buckets=_GENERATION_BUCKETS,
)

_started: set[int] = set()


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> int:
    """Serves /metrics of `registry` on `port` once per process (0 = off). Returns the port."""
    if port and port not in _started:
        start_http_server(port, addr=addr, registry=registry)
        _started.add(port)
        log.info("metrics endpoint up", extra={"port": port})
    return port
