"""The Kubernetes executor: creates a run's objects with the official client, then an informer loop (list, then
watch until the resync interval, repeat) maps each Job's status onto the run's state; loss comes from rank-0 logs.

Its API calls are exactly what deploy/base/trainer-rbac.yaml grants (tests/trainer records them against kmock):
jobs create/get/list/watch/delete, services create/delete, persistentvolumeclaims create, pods list, pods/log get."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable
from services.trainer.events import parse_event
from services.trainer.executors import OnSuccess
from services.trainer.render import (
    CHECKPOINT_MOUNT,
    COMPLETION_INDEX_ANNOTATION,
    RUN_LABEL,
    label_selector,
    render_run,
)
from services.trainer.spec import FINAL_DIR, TrainSpec, parse_spec
from services.trainer.store import ACTIVE, FAILED, PENDING, RUNNING, SUCCEEDED, Run, RunStore

log = logging.getLogger(__name__)

PROPAGATIONS = ("Background", "Foreground")


def api_client(settings: Settings) -> client.ApiClient:
    """`settings.trainer.kube_url` when set (no auth: a proxy or a test server), else in-cluster, else kubeconfig."""
    if settings.trainer.kube_url:
        cfg = client.Configuration()
        cfg.host = settings.trainer.kube_url.rstrip("/")
        return client.ApiClient(cfg)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """(run state, reason) from a Job's status: conditions first, then active/ready pods."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        kind = cond.get("type")
        detail = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
        if kind in ("Complete", "SuccessCriteriaMet"):
            return SUCCEEDED, detail or "Job complete"
        if kind in ("Failed", "FailureTarget"):
            return FAILED, detail or "Job failed"
        if kind == "Suspended":
            return PENDING, detail or "Job suspended"
    if status.get("active") or status.get("ready"):
        return RUNNING, f"{status.get('active', 0)} pod(s) active"
    return PENDING, "waiting for pods"


def _status(exc: ApiException) -> int:
    return int(getattr(exc, "status", 0) or 0)


class KubernetesExecutor:
    name = "kubernetes"

    def __init__(self, settings: Settings, store: RunStore, on_success: OnSuccess) -> None:
        self.settings = settings
        self.store = store
        self.on_success = on_success
        self.namespace = settings.trainer.namespace
        self.api = api_client(settings)
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self._log_lines: dict[str, int] = {}
        self._reconcile_lock = threading.Lock()

    # --- objects ---

    def start(self, run: Run, spec: TrainSpec) -> None:
        rendered = render_run(spec, self.settings, run.id)
        try:
            for obj in rendered.objects:
                self._create(obj)
        except ApiException as exc:
            raise DependencyUnavailable(f"Kubernetes API refused the run's objects: {exc.status} {exc.reason}") from exc
        except Exception as exc:  # connection refused, DNS, TLS
            raise DependencyUnavailable(f"Kubernetes API unreachable: {exc}") from exc
        self.store.log(run.id, f"created Job {rendered.job_name} in namespace {self.namespace}")

    def _create(self, obj: dict[str, Any]) -> None:
        kind = obj["kind"]
        create = {
            "Job": self.batch.create_namespaced_job,
            "Service": self.core.create_namespaced_service,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
        }[kind]
        try:
            create(self.namespace, obj, _preload_content=False)
        except ApiException as exc:
            if _status(exc) != 409:  # already there: a re-submit, or a controller restarted mid-creation
                raise

    def _read_job(self, name: str) -> dict[str, Any] | None:
        try:
            resp = self.batch.read_namespaced_job(name, self.namespace, _preload_content=False)
        except ApiException as exc:
            if _status(exc) == 404:
                return None
            raise
        return json.loads(resp.data)

    def _list_jobs(self) -> list[dict[str, Any]]:
        try:
            resp = self.batch.list_namespaced_job(
                self.namespace, label_selector=label_selector(), _preload_content=False
            )
        except ApiException as exc:
            if _status(exc) == 404:  # no Job resource served yet (an empty emulator): nothing to list
                return []
            raise
        return [j for j in json.loads(resp.data).get("items", []) if _run_id(j)]

    def cancel(self, run: Run, propagation: str) -> None:
        policy = propagation if propagation in PROPAGATIONS else "Background"
        body = client.V1DeleteOptions(propagation_policy=policy)
        deletes = [
            (self.batch.delete_namespaced_job, run.job_name),
            (self.core.delete_namespaced_service, run.job_name),
        ]
        for delete, name in deletes:
            try:
                delete(name, self.namespace, body=body, _preload_content=False)
            except ApiException as exc:
                if _status(exc) != 404:
                    raise DependencyUnavailable(f"could not delete {name}: {exc.status} {exc.reason}") from exc

    # --- reconciliation ---

    def adopt(self, runs: list[Run]) -> None:
        """Starts the informer; its first relist reconciles every active run (and recreates missing Jobs)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._inform, name="trainer-informer", daemon=True)
            self._thread.start()

    def resync(self) -> None:
        """One full pass: every active Kubernetes run against its Job."""
        jobs = {_run_id(j): j for j in self._list_jobs()}
        for run in self.store.list(states=ACTIVE, executor=self.name, limit=10_000):
            self._reconcile(run, jobs.get(run.id), listed=True)

    def _inform(self) -> None:
        while not self._stop.is_set():
            try:
                self.resync()
                self._watch_once()
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("Job informer error; relisting: %s", str(exc)[:300])
                self._stop.wait(min(self.settings.trainer.resync_s, 2.0))

    def _watch_once(self) -> None:
        """Watches the managed Jobs until the resync interval ends (client-side timeout), reconciling each event."""
        timeout = max(1.0, self.settings.trainer.resync_s)
        self._watch = watch.Watch()
        try:
            for event in self._watch.stream(
                self.batch.list_namespaced_job,
                self.namespace,
                label_selector=label_selector(),
                timeout_seconds=int(timeout),
                _request_timeout=timeout,
                deserialize=False,
            ):
                if self._stop.is_set():
                    return
                job = event.get("object") or {}
                run_id = _run_id(job)
                if not run_id:
                    continue
                run = self.store.find(run_id)
                if run is None or run.terminal:
                    continue
                self._reconcile(run, None if event.get("type") == "DELETED" else job, listed=False)
        except Exception as exc:
            if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
                return  # the resync interval is over: relist
            raise
        finally:
            self._watch = None

    def _reconcile(self, run: Run, job: dict[str, Any] | None, *, listed: bool) -> None:
        with self._reconcile_lock:
            current = self.store.find(run.id)
            if current is None or current.terminal:
                return
            if job is None and listed:
                job = self._read_job(run.job_name)  # the list may be filtered by a server without selectors
            if job is None:
                if current.state == PENDING:
                    self._recreate(current)
                else:
                    self.store.transition(run.id, FAILED, f"Job {run.job_name} disappeared")
                return
            state, reason = job_state(job)
            if state == RUNNING or (state in (SUCCEEDED, FAILED) and current.state == RUNNING):
                self._pull_losses(current)
            if state == SUCCEEDED:
                uri = self._final_uri(current)
                try:
                    self.on_success(run.id, uri)
                except Exception as exc:
                    log.exception("publishing failed", extra={"run_id": run.id})
                    self.store.log(run.id, f"publishing failed: {exc}")
            if state != current.state:
                self.store.transition(run.id, state, reason)

    def _recreate(self, run: Run) -> None:
        """A Pending run without a Job: the controller stopped between the catalog write and the create."""
        try:
            spec = parse_spec(run.spec)
        except Exception as exc:
            self.store.transition(run.id, FAILED, f"stored spec no longer valid: {exc}")
            return
        log.info("creating the missing Job of a pending run", extra={"run_id": run.id})
        self.start(run, spec)

    def _final_uri(self, run: Run) -> str:
        spec = parse_spec(run.spec)
        base = spec.output or f"{CHECKPOINT_MOUNT}/{run.id}"
        return f"{base.rstrip('/')}/{FINAL_DIR}"

    def _pull_losses(self, run: Run) -> None:
        """Reads the rank-0 pod's log and records the step events not seen yet (best effort)."""
        try:
            resp = self.core.list_namespaced_pod(
                self.namespace, label_selector=f"{RUN_LABEL}={run.id}", _preload_content=False
            )
            pods = [p for p in json.loads(resp.data).get("items", []) if _run_id(p) == run.id]
            pods.sort(key=lambda p: (p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0"))
            if not pods:
                return
            resp = self.core.read_namespaced_pod_log(
                pods[0]["metadata"]["name"], self.namespace, _preload_content=False
            )
            text = resp.data.decode("utf-8", errors="replace")
        except Exception as exc:
            log.debug("no pod log yet: %s", str(exc)[:300], extra={"run_id": run.id})
            return
        for line in text.splitlines():
            event = parse_event(line)
            if event and event["kind"] == "step":
                self.store.record_loss(run.id, int(event["step"]), float(event["loss"]))

    def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.trainer.resync_s + 5)
        self.api.close()


def _run_id(obj: dict[str, Any]) -> str:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(RUN_LABEL, "")
