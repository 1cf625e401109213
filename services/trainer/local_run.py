"""A training run on this machine, start to publish, in one call: what `ponyctl train submit --local` and the
demo use. The run goes through the same controller and local executor as the service (catalog rows, events)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable
from services.trainer.spec import TrainSpec
from services.trainer.store import Run, RunEvent


def demo_spec(manifest: str | Path, name: str = "demo", steps: int = 4) -> dict[str, Any]:
    """A short two-stage spec (32 px then 64 px buckets) for the tiny AuraFlow model on CPU."""
    half = max(1, steps // 2)
    return {
        "name": name,
        "manifest": str(manifest),
        "seed": 0,
        "max_sequence_length": 32,
        "stages": [
            {"name": "low", "resolution": 32, "steps": half, "batch_size": 2, "bucket_step": 16},
            {"name": "high", "resolution": 64, "steps": max(1, steps - half), "batch_size": 2, "bucket_step": 16},
        ],
        "optimizer": {"learning_rate": 1e-3},
        "checkpoint": {"every": max(1, steps), "keep": 1},
    }


def train_locally(
    settings: Settings,
    spec: str | dict[str, Any] | TrainSpec,
    *,
    run_id: str = "",
    timeout_s: float | None = None,
    on_event: Callable[[Run, RunEvent], None] | None = None,
) -> Run:
    """Submits `spec` to a local-executor TrainerService, waits for the run to end, and returns it.

    On success the final pipeline is published as the next `pony_v7` version (run.model_version, the
    model_versions row, and the sampler's LoadVersion when `settings.sampler_addr` answers).
    Raises InvalidArgument for a bad spec; DependencyUnavailable when `timeout_s` passes (the run is cancelled).
    """
    from services.trainer.service import TrainerService

    service = TrainerService(settings.replace(trainer_executor="local"))
    service.load()
    try:
        run = service.submit(spec, run_id=run_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        after = 0
        while True:
            events = service.events(run.id, after)
            run = service.get(run.id)
            for event in events:
                after = event.id
                if on_event is not None:
                    on_event(run, event)
            if run.terminal and not events:
                return run
            if deadline is not None and time.monotonic() > deadline:
                service.cancel(run.id)
                raise DependencyUnavailable(f"run {run.id} did not finish within {timeout_s} s; cancelled")
            if not events:
                time.sleep(0.2)
    finally:
        service.close()
