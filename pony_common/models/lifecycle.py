"""The lifecycle every served model shares (as KServe's `Model`): `load()` once, `ready`, `teardown()`.

A service's `model.py` subclasses `Model` and fills `_load`/`_teardown`; it knows nothing of gRPC. The bootstrap
calls `load()` in a thread after the port is bound and turns readiness SERVING when it returns; a `load()` that
raises is called again after a backoff, so `_load` must start over cleanly after a failed try. Before transformers or
diffusers see a model path, `_load` passes it through `pony_common.models.sources.require_model_source` (one line
naming the path and the fix when there is no such folder). Service logic calls `require_ready()` before using the
model, so a call during the load is UNAVAILABLE (retry later).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import TypeVar

from pony_common.errors import DependencyUnavailable

T = TypeVar("T")


class Model(ABC):
    """A model a service serves. `load()` is idempotent and thread-safe; `teardown()` frees it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ready = False
        self._lifecycle_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def model_id(self) -> str:
        """What is loaded (a path or hub id), for logs and the model-info metric."""
        return ""

    def load(self) -> None:
        """Loads the model unless it is loaded already."""
        with self._lifecycle_lock:
            if self._ready:
                return
            self._load()
            self._ready = True

    def teardown(self) -> None:
        """Releases what `load()` acquired; a later `load()` loads again."""
        with self._lifecycle_lock:
            was_ready, self._ready = self._ready, False
            if was_ready:
                self._teardown()

    def require_ready(self) -> None:
        """Raises UNAVAILABLE (retry later) while the model is not loaded."""
        if not self._ready:
            raise DependencyUnavailable(f"the {self.name} is still loading its model")

    def loaded(self, part: T | None) -> T:
        """`part` (something `_load` set) once the model is ready; UNAVAILABLE before."""
        self.require_ready()
        assert part is not None, f"{self.name}: ready but a part is missing"
        return part

    @abstractmethod
    def _load(self) -> None:
        """The blocking load (weights, tokenizers, connections)."""

    def _teardown(self) -> None:  # noqa: B027 (optional hook)
        """Frees what `_load` acquired (default: nothing)."""
