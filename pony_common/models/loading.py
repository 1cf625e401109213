"""One lock for building or loading models in a process.

transformers and accelerate patch process-wide state while they build a model (meta-device parameter
registration, skipped weight init). Two threads loading at once (several services in one process, a test
building a model beside a service that is still loading) can then leave parameters on the meta device or
untie shared weights. Every load in the platform takes this lock; it is reentrant, so a service load that
loads a shared tower inside it does not deadlock."""

from __future__ import annotations

import threading

model_load_lock = threading.RLock()
