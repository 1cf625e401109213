"""Kubernetes objects of a training run: the checkpoint PVC, and a Job (one node) or a headless Service plus an
Indexed Job (several nodes, torchrun node rank = completion index) on the training pool. The spec travels in the
container's environment (PONY_TRAIN_SPEC), so the controller needs no rights beyond Jobs, Services and PVCs."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from pony_common.config import Settings
from services.trainer.spec import TrainSpec

MANAGED_BY = "pony-trainer-controller"
RUN_LABEL = "pony.ai/run-id"
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "training-job"  # what the training NetworkPolicy (deploy/base/network-policies.yaml) selects
APP_LABELS = {
    "app.kubernetes.io/name": "pony-trainer",
    "app.kubernetes.io/managed-by": MANAGED_BY,
    "app.kubernetes.io/part-of": "pony",
}
SPEC_ENV = "PONY_TRAIN_SPEC"
SPEC_REF = f"env:{SPEC_ENV}"  # `python -m services.trainer.training.train --spec env:PONY_TRAIN_SPEC`
CHECKPOINT_MOUNT = "/checkpoints"
MASTER_PORT = 29500
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
GPU = "nvidia.com/gpu"
UID = 10001  # the images' user (deploy/docker/*.Dockerfile)
JOB_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class RenderedRun:
    """The objects of one run, in creation order, plus the names the controller tracks."""

    job_name: str
    service_name: str  # "" for a single-node run
    pvc: dict[str, Any]
    service: dict[str, Any] | None
    job: dict[str, Any]

    @property
    def objects(self) -> list[dict[str, Any]]:
        return [o for o in (self.pvc, self.service, self.job) if o is not None]


def job_name(run_id: str) -> str:
    return f"train-{run_id}"


def run_labels(run_id: str) -> dict[str, str]:
    return {**APP_LABELS, COMPONENT_LABEL: COMPONENT, RUN_LABEL: run_id}


def label_selector(run_id: str | None = None) -> str:
    parts = [f"app.kubernetes.io/managed-by={MANAGED_BY}"]
    if run_id:
        parts.append(f"{RUN_LABEL}={run_id}")
    return ",".join(parts)


def env_literal(value: str) -> str:
    """`value` as a container env value the kubelet passes on unchanged (it expands `$(VAR)` and `$$` -> `$`)."""
    return value.replace("$", "$$")


def gpus_per_node(spec: TrainSpec, settings: Settings) -> int:
    """GPUs each pod asks for: none when PONY_TRAINER_POOL_LABEL is empty (a cluster without a training pool)."""
    return spec.resources.gpus_per_node if settings.trainer.pool_label else 0


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
    args += ["-m", "services.trainer.training.train", "--spec", SPEC_REF, "--run-id", run_id]
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
        SPEC_ENV: env_literal(spec.to_yaml()),
        "PONY_DEVICE": "cuda" if gpus_per_node(spec, settings) > 0 else "cpu",
        "PONY_BLOB_URL": env_literal(settings.blob_url),
        "PONY_MODELS_DIR": settings.models_dir,
        "PONY_TRAINER_OUTPUT_DIR": CHECKPOINT_MOUNT,
        "PONY_LOG_JSON": "true",
        "PONY_STATE_DIR": "/tmp/pony",
        "HOME": "/tmp",
        "HF_HOME": "/tmp/hf",
        "PYTHONUNBUFFERED": "1",
    }
    if spec.sharding.strategy == "fsdp" and gpus_per_node(spec, settings) > 0:
        # FSDP2 all-gathers and frees block-sized buffers every step: expandable segments avoid the fragmentation
        # that otherwise costs several GB per rank at 6.8B parameters (as torchtitan sets it).
        plain["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env += [{"name": k, "value": v} for k, v in plain.items()]
    return env


def _placement(spec: TrainSpec, settings: Settings) -> dict[str, Any]:
    """Required node affinity `<PONY_TRAINER_POOL_LABEL> In [pool]` plus the GPU taint toleration; nothing when
    the label is empty (dev: the Job lands on any node, on CPU)."""
    key = settings.trainer.pool_label
    if not key:
        return {}
    term = {"matchExpressions": [{"key": key, "operator": "In", "values": [spec.resources.pool]}]}
    return {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}},
        "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
    }


def _volumes(
    spec: TrainSpec, settings: Settings, image: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, the trainer's mounts, init containers): /dev/shm, /tmp, checkpoints, the models (a PVC, or tiny
    models written by an init container) and, for a local-path blob store, its PVC."""
    res = spec.resources
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": res.checkpoint_pvc}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
    ]
    init: list[dict[str, Any]] = []
    if settings.trainer.models_pvc:
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": settings.trainer.models_pvc, "readOnly": True}}
        )
        mounts.append({"name": "models", "mountPath": settings.models_dir, "readOnly": True})
    else:
        volumes.append({"name": "models", "emptyDir": {}})
        mounts.append({"name": "models", "mountPath": settings.models_dir, "readOnly": True})
        init.append(
            {
                "name": "models-tiny",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["ponyctl", "models", "tiny", settings.models_dir],
                "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PONY_STATE_DIR", "value": "/tmp/pony"}],
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
                "securityContext": _security_context(),
                "volumeMounts": [
                    {"name": "models", "mountPath": settings.models_dir},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        )
    if settings.trainer.blobs_pvc and "://" not in settings.blob_url:
        volumes.append({"name": "blobs", "persistentVolumeClaim": {"claimName": settings.trainer.blobs_pvc}})
        mounts.append({"name": "blobs", "mountPath": settings.blob_url})
    return volumes, mounts, init


def _pod_template(spec: TrainSpec, settings: Settings, run_id: str, master: str | None, subdomain: str) -> dict:
    res = spec.resources
    image = res.image or settings.trainer.image
    limits: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    gpus = gpus_per_node(spec, settings)
    if gpus:
        limits[GPU] = str(gpus)
    volumes, mounts, init = _volumes(spec, settings, image)
    container = {
        "name": "trainer",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": _torchrun(spec, run_id, master),
        "env": _env(spec, settings, indexed=master is not None),
        "resources": {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": limits},
        "securityContext": _security_context(),
        "volumeMounts": mounts,
        "ports": [{"name": "rdzv", "containerPort": MASTER_PORT, "protocol": "TCP"}],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "priorityClassName": res.priority_class,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **_placement(spec, settings),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if init:
        pod_spec["initContainers"] = init
    if subdomain:
        pod_spec["subdomain"] = subdomain
    return {"metadata": {"labels": run_labels(run_id)}, "spec": pod_spec}


def render_run(spec: TrainSpec, settings: Settings, run_id: str) -> RenderedRun:
    """All objects of a run in the controller's namespace; `spec` rides in the trainer container's env as YAML."""
    ns = settings.trainer.namespace
    name = job_name(run_id)
    res = spec.resources
    indexed = res.nodes > 1
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": res.checkpoint_pvc, "namespace": ns, "labels": dict(APP_LABELS)},
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
        "template": _pod_template(spec, settings, run_id, master, name if indexed else ""),
    }
    if indexed:
        job_spec.update({"completionMode": "Indexed", "completions": res.nodes, "parallelism": res.nodes})
    if res.active_deadline_s:
        job_spec["activeDeadlineSeconds"] = res.active_deadline_s
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, ns, run_id), "spec": job_spec}
    return RenderedRun(name, name if indexed else "", pvc, service, job)


def command_line(job: dict[str, Any]) -> str:
    """The trainer container's command as one shell line (for logs and reports)."""
    return shlex.join(job["spec"]["template"]["spec"]["containers"][0]["command"])
