"""The trainer service, free of gRPC: submit/get/list/cancel/watch runs on one executor, publish on success."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pony_common.catalog import Catalog, catalog_for
from pony_common.config import Settings
from pony_common.errors import FailedPrecondition, InvalidArgument
from pony_common.models.lifecycle import Model
from services.trainer.executors import Executor
from services.trainer.publish import Published, publish_run
from services.trainer.render import CHECKPOINT_MOUNT, gpus_per_node
from services.trainer.spec import TrainSpec, confine_spec, parse_spec, parse_spec_text
from services.trainer.store import ACTIVE, CANCELLED, FAILED, STATES, Run, RunEvent, RunStore

log = logging.getLogger(__name__)

RUN_ID_RE = re.compile(r"^[a-z]([-a-z0-9]{0,37}[a-z0-9])?$")
EXECUTORS = ("local", "kubernetes")


def make_executor(settings: Settings, store: RunStore, on_success: Any) -> Executor:
    if settings.trainer.executor == "local":
        from services.trainer.executors.local import LocalExecutor

        return LocalExecutor(settings, store, on_success)
    if settings.trainer.executor == "kubernetes":
        from services.trainer.executors.cluster import KubernetesExecutor

        return KubernetesExecutor(settings, store, on_success)
    raise FailedPrecondition(f"PONY_TRAINER_EXECUTOR={settings.trainer.executor!r}; use one of {EXECUTORS}")


class TrainerService(Model):
    """Runs live in the catalog; the executor (local process or Kubernetes Jobs) moves them through
    Pending -> Running -> Succeeded | Failed, or Cancelled. `load()` adopts runs an earlier process left active;
    submit and cancel wait for it (UNAVAILABLE before)."""

    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        super().__init__("trainer controller")
        self.settings = settings
        self.catalog = catalog or catalog_for(settings.database_url)
        self.store = RunStore(self.catalog)
        self.executor = make_executor(settings, self.store, self._on_success)
        self.published: list[Published] = []

    @property
    def model_id(self) -> str:
        return self.settings.trainer.executor

    def _load(self) -> None:
        active = self.store.list(states=ACTIVE, executor=self.executor.name, limit=10_000)
        if active:
            log.info("adopting active runs", extra={"runs": [r.id for r in active]})
        self.executor.adopt(active)

    def close(self) -> None:
        """Not ready any more, then the executor stops (also after a failed load: adopt may have started work)."""
        self.teardown()
        self.executor.close()

    def _on_success(self, run_id: str, uri: str) -> None:
        self.published.append(publish_run(self.settings, self.store, run_id, uri))

    # --- API ---

    def submit(self, spec: str | dict[str, Any] | TrainSpec, run_id: str = "") -> Run:
        """Validates and starts a run; the same `run_id` again returns the existing run unchanged."""
        self.require_ready()
        if isinstance(spec, TrainSpec):
            parsed = spec
        elif isinstance(spec, str):
            if not spec.strip():
                raise InvalidArgument("spec_yaml", "is empty")
            parsed = parse_spec_text(spec)
        else:
            parsed = parse_spec(spec)
        # Paths in the spec are where the run's pods look: a Kubernetes run writes under the checkpoint mount.
        confine_spec(parsed, self.settings, (CHECKPOINT_MOUNT,) if self.executor.name == "kubernetes" else ())
        if run_id and not RUN_ID_RE.match(run_id):
            raise InvalidArgument("run_id", "must be 1-39 lower-case letters, digits or '-', starting with a letter")
        if run_id:
            existing = self.store.find(run_id)
            if existing is not None:
                return existing
        run_id = run_id or f"{parsed.name}-{uuid.uuid4().hex[:8]}"
        if self.executor.name == "local":
            self._check_local_paths(parsed)
        if self._gpus_per_node(parsed) > 0:
            self._check_memory_plan(parsed)
        job_name = f"train-{run_id}" if self.executor.name == "kubernetes" else ""
        namespace = self.settings.trainer.namespace if self.executor.name == "kubernetes" else ""
        run = self.store.create(run_id, parsed.name, parsed.to_dict(), self.executor.name, namespace, job_name)
        try:
            self.executor.start(run, parsed)
        except Exception as exc:
            self.store.transition(run_id, FAILED, f"could not start: {exc}")
            raise
        log.info("submitted run", extra={"run_id": run_id, "executor": self.executor.name})
        return self.store.get(run_id)

    def _gpus_per_node(self, spec: TrainSpec) -> int:
        """The GPUs a run's processes get: a Kubernetes Job has none without a pool label to pin it (render.py)."""
        if self.executor.name == "kubernetes":
            return gpus_per_node(spec, self.settings)
        return spec.resources.gpus_per_node

    def _check_memory_plan(self, spec: TrainSpec) -> None:
        """A GPU run whose memory plan (services/trainer/plan.py) exceeds one pool GPU is refused, naming the field
        to change and the figures; the plan reads the base model's config here when it can, else the built-in V7."""
        from pony_common.config import ConfigError
        from services.trainer.plan import plan_memory, refusal

        plan = plan_memory(spec, base_model=spec.base_model or self.settings.model_path("trainer"))
        try:
            refused = refusal(
                plan, spec, self.settings.trainer.gpu_memory_gib, self.settings.trainer.gpu_memory_headroom
            )
        except ConfigError as exc:
            raise FailedPrecondition(str(exc)) from None
        if refused is not None:
            log.info("refused run by memory plan", extra={"spec": spec.name, "needs_gib": plan.gpu_bytes / 2**30})
            raise refused

    def _check_local_paths(self, spec: TrainSpec) -> None:
        if "://" not in spec.manifest and not Path(spec.manifest).exists():
            raise InvalidArgument("spec.manifest", f"{spec.manifest} does not exist")
        base = spec.base_model or self.settings.model_path("trainer")
        if "://" not in base and not Path(base).exists():
            field = "spec.base_model" if spec.base_model else "spec.base_model (default model path)"
            raise InvalidArgument(field, f"{base} does not exist (run `ponyctl models tiny` for the tiny model)")

    def get(self, run_id: str) -> Run:
        if not run_id:
            raise InvalidArgument("run_id", "is required")
        return self.store.get(run_id)

    def list_runs(
        self, states: tuple[str, ...] = (), page_size: int = 100, page_token: str = ""
    ) -> tuple[list[Run], str]:
        for i, state in enumerate(states):
            if state not in STATES:
                raise InvalidArgument(f"states[{i}]", f"unknown state {state!r}")
        if not 0 <= page_size <= 1000:
            raise InvalidArgument("page_size", "must be 0..1000")
        size = page_size or 100
        # A token is the offset this server issued: plain ASCII digits (int() would take "-5" or "1_000").
        if page_token and not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 18):
            raise InvalidArgument("page_token", "not a token this server issued")
        offset = int(page_token or 0)
        runs = self.store.list(states=states, limit=size + 1, offset=offset)
        more = len(runs) > size
        return runs[:size], str(offset + size) if more else ""

    def cancel(self, run_id: str, propagation: str = "Background") -> Run:
        """Marks the run Cancelled and stops its work; a finished run is returned unchanged."""
        self.require_ready()
        run = self.get(run_id)
        if run.terminal:
            return run
        if propagation not in ("Background", "Foreground"):
            raise InvalidArgument("propagation", "must be Background or Foreground")
        if self.store.transition(run_id, CANCELLED, "cancelled by user"):
            self.executor.cancel(run, propagation)
        return self.store.get(run_id)

    def evaluate(self, request: Any) -> Any:
        """A style-adherence evaluation (services/trainer/evaluation/engine.py: EvalRequest -> EvalOutcome), stored
        with the model version; blocking for as long as the grid takes."""
        from services.trainer.evaluation.engine import Evaluator

        return Evaluator(self.settings, self.catalog).run(request)

    def events(self, run_id: str, after_id: int = 0) -> list[RunEvent]:
        return self.store.events(run_id, after_id)

    def watch(self, run_id: str, after_id: int = 0, poll_s: float = 0.2) -> Iterator[tuple[Run, RunEvent | None]]:
        """(run, None) first, then (run, event) for each new event until the run has ended (blocking)."""
        run = self.get(run_id)
        yield run, None
        while True:
            events = self.store.events(run_id, after_id)
            run = self.store.get(run_id)
            for event in events:
                after_id = event.id
                yield run, event
            if run.terminal and not events:
                return
            if not events:
                time.sleep(poll_s)
