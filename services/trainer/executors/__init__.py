"""Executors run a training run somewhere and drive its state in the catalog: `local` (a subprocess) or
`kubernetes` (Jobs on the training pool). Both share the RunStore state machine and the publish callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from services.trainer.spec import TrainSpec
from services.trainer.store import Run

# Called with (run_id, final pipeline uri) when a run succeeded, before it is marked Succeeded.
OnSuccess = Callable[[str, str], None]


class Executor(Protocol):
    name: str

    def start(self, run: Run, spec: TrainSpec) -> None:
        """Starts the run; raises DependencyUnavailable when the place it runs cannot be reached."""

    def cancel(self, run: Run, propagation: str) -> None:
        """Stops the run's work (the caller has marked it Cancelled)."""

    def adopt(self, runs: list[Run]) -> None:
        """Picks up runs left Pending/Running by an earlier controller process."""

    def close(self) -> None: ...
