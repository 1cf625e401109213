"""Kubernetes objects of a training run: spec ConfigMap, checkpoint PVC, and a Job (one node) or a headless
Service plus an Indexed Job (several nodes, torchrun node rank = completion index), pinned to the training pool."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from pony_common.config import Settings
from services.trainer.spec import TrainSpec

MANAGED_BY = "pony-trainer-controller"
RUN_LABEL = "pony.ai/run-id"
APP_LABELS = {"app.kubernetes.io/name": "pony-trainer", "app.kubernetes.io/managed-by": MANAGED_BY}
SPEC_MOUNT = "/etc/pony/train"
CHECKPOINT_MOUNT = "/checkpoints"
MASTER_PORT = 29500
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
UID = 1000
JOB_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class RenderedRun:
    """The objects of one run, in creation order, plus the names the controller tracks."""

    job_name: str
    service_name: str  # "" for a single-node run
    config_map: dict[str, Any]
    pvc: dict[str, Any]
    service: dict[str, Any] | None
    job: dict[str, Any]

    @property
    def objects(self) -> list[dict[str, Any]]:
        return [o for o in (self.pvc, self.config_map, self.service, self.job) if o is not None]


def job_name(run_id: str) -> str:
    return f"train-{run_id}"


def run_labels(run_id: str) -> dict[str, str]:
    return {**APP_LABELS, RUN_LABEL: run_id}


def label_selector(run_id: str | None = None) -> str:
    parts = [f"app.kubernetes.io/managed-by={MANAGED_BY}"]
    if run_id:
        parts.append(f"{RUN_LABEL}={run_id}")
    return ",".join(parts)


def _meta(name: str, namespace: str, run_id: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": run_labels(run_id)}


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _torchrun(spec: TrainSpec, run_id: str, master: str | None) -> list[str]:
    res = spec.resources
    args = ["torchrun", f"--nnodes={res.nodes}", f"--nproc-per-node={res.processes_per_node}"]
    if master is None:
        args.append("--standalone")
    else:
        # $(JOB_COMPLETION_INDEX) is expanded by the kubelet from the container env below.
        args += ["--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={master}", f"--master-port={MASTER_PORT}"]
    args += ["-m", "services.trainer.train", "--spec", f"{SPEC_MOUNT}/spec.yaml", "--run-id", run_id]
    return args


def _env(spec: TrainSpec, settings: Settings, indexed: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if indexed:
        env.append(
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
            }
        )
    plain = {
        "PONY_DEVICE": "cuda" if spec.resources.gpus_per_node > 0 else "cpu",
        "PONY_BLOB_URL": settings.blob_url,
        "PONY_MODELS_DIR": settings.models_dir,
        "PONY_TRAINER_OUTPUT_DIR": CHECKPOINT_MOUNT,
        "PONY_LOG_JSON": "true",
        "HOME": "/tmp",
        "HF_HOME": "/tmp/hf",
        "PYTHONUNBUFFERED": "1",
    }
    env += [{"name": k, "value": v} for k, v in plain.items()]
    return env


def _pod_template(
    spec: TrainSpec, settings: Settings, run_id: str, config_map: str, master: str | None, subdomain: str
) -> dict[str, Any]:
    res = spec.resources
    limits: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus_per_node:
        limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    container = {
        "name": "trainer",
        "image": res.image or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": _torchrun(spec, run_id, master),
        "env": _env(spec, settings, indexed=master is not None),
        "resources": {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": limits},
        "securityContext": _security_context(),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
            {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
        ],
        "ports": [{"name": "rdzv", "containerPort": MASTER_PORT, "protocol": "TCP"}],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "priorityClassName": res.priority_class,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "nodeSelector": {settings.trainer_pool_label: res.pool},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": res.checkpoint_pvc}},
            {"name": "spec", "configMap": {"name": config_map}},
        ],
    }
    if subdomain:
        pod_spec["subdomain"] = subdomain
    return {"metadata": {"labels": run_labels(run_id)}, "spec": pod_spec}


def render_run(spec: TrainSpec, settings: Settings, run_id: str) -> RenderedRun:
    """All objects of a run in the controller's namespace; `spec` is rendered into the ConfigMap as YAML."""
    ns = settings.trainer_namespace
    name = job_name(run_id)
    res = spec.resources
    indexed = res.nodes > 1
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(f"{name}-spec", ns, run_id),
        "data": {"spec.yaml": spec.to_yaml()},
    }
    pvc_meta = {"name": res.checkpoint_pvc, "namespace": ns, "labels": dict(APP_LABELS)}
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": pvc_meta,
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": res.checkpoint_size}},
        },
    }
    service = None
    master = None
    if indexed:
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(name, ns, run_id),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {RUN_LABEL: run_id},
                "ports": [{"name": "rdzv", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
            },
        }
        # Indexed Job pods are named <job>-<index> and resolve as <job>-<index>.<service>.
        master = f"{name}-0.{name}.{ns}.svc"
    job_spec: dict[str, Any] = {
        "backoffLimit": res.backoff_limit,
        "ttlSecondsAfterFinished": JOB_TTL_S,
        "template": _pod_template(
            spec, settings, run_id, config_map["metadata"]["name"], master, name if indexed else ""
        ),
    }
    if indexed:
        job_spec.update({"completionMode": "Indexed", "completions": res.nodes, "parallelism": res.nodes})
    if res.active_deadline_s:
        job_spec["activeDeadlineSeconds"] = res.active_deadline_s
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, ns, run_id), "spec": job_spec}
    return RenderedRun(name, name if indexed else "", config_map, pvc, service, job)


def command_line(job: dict[str, Any]) -> str:
    """The trainer container's command as one shell line (for logs and reports)."""
    return shlex.join(job["spec"]["template"]["spec"]["containers"][0]["command"])
