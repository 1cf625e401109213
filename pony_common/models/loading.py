"""One lock for building or loading models in a process.

transformers and accelerate patch process-wide state while they build a model (meta-device parameter
registration, skipped weight init). Two threads loading at once (several services in one process, a test
building a model beside a service that is still loading) can then leave parameters on the meta device or
untie shared weights. Every load in the platform takes this lock; it is reentrant, so a service load that
loads a shared tower inside it does not deadlock."""

from __future__ import annotations

import logging
import threading
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

model_load_lock = threading.RLock()

PipelineT = TypeVar("PipelineT")


def load_diffusers_pipeline(pipeline_class: type[PipelineT], path: str, device: str, dtype: Any) -> PipelineT:
    """`pipeline_class.from_pretrained(path)` (a local folder or a hub id) under the load lock, moved to `device`,
    progress bar off: how every family's pipeline loads (pony_common.models.auraflow / sdxl `load_pipeline`)."""
    logger.info("loading %s %s on %s (%s)", pipeline_class.__name__, path, device, dtype)
    with model_load_lock:
        pipe = pipeline_class.from_pretrained(path, dtype=dtype)  # type: ignore[attr-defined]
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
