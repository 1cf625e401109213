"""Rendering the kustomize overlays with the real kubectl, and the checks the deploy tests apply to them."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import SHARED_REF as _SHARED_REF

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod", "prod-redis")
SCHEMAS = Path(__file__).resolve().parent / "schemas"  # copies of /work/shared/ref (see its README)
SHARED_REF = _SHARED_REF
KEDA_CRDS = SCHEMAS / "keda"
CERT_MANAGER_CRDS = SCHEMAS / "cert-manager"
SKAFFOLD_SCHEMA = SCHEMAS / "skaffold-schema.json"

POOL_KEY = "pony.ai/pool"
GPU_POOLS = {
    "captioner": "large-vram",
    "scorer": "small-gpu",
    "style-tagger": "small-gpu",
    "safety": "small-gpu",
    "triton": "inference",
}
GRPC_PORTS = {
    "captioner": 50051,
    "scorer": 50052,
    "style-tagger": 50053,
    "safety": 50054,
    "trainer": 50055,
    "sampler": 50056,
}
QUEUES = ("caption", "score", "style", "safety", "persist", "generate", "train")
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]

_WORKLOAD_POD_PATHS = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(overlay: str) -> list[Obj]:
    """`kubectl kustomize deploy/overlays/<overlay>`, parsed; raises with kubectl's stderr on failure."""
    return render_dir(DEPLOY / "overlays" / overlay)


def render_dir(path: Path) -> list[Obj]:
    """`kubectl kustomize <path>`, parsed."""
    exe = kubectl()
    if exe is None:
        raise RuntimeError("kubectl is not installed")
    done = subprocess.run(
        [exe, "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{done.stderr}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(objs: list[Obj], kind: str, obj_name: str) -> Obj:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == obj_name:
            return obj
    raise KeyError(f"{kind}/{obj_name} not rendered")


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def pod_spec(obj: Obj) -> Obj | None:
    path = _WORKLOAD_POD_PATHS.get(obj["kind"])
    if path is None:
        return None
    spec: Any = obj
    for key in path:
        spec = spec[key]
    return spec


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {})
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def workloads(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objs:
        spec = pod_spec(obj)
        if spec is not None:
            yield obj, spec


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def images(objs: list[Obj]) -> dict[str, str]:
    """Every image reference in the rendered objects -> where it was found."""
    found: dict[str, str] = {}
    for obj, spec in workloads(objs):
        for c in containers(spec):
            found[c["image"]] = f"{name(obj)} container {c['name']}"
    for cm in of_kind(objs, "ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            if key.endswith("_IMAGE"):
                found[value] = f"{name(cm)} {key}"
    return found


def image_tag(ref: str) -> str | None:
    """The tag of an image reference (None when it has none): `registry:5000/a/b:tag@sha256:...`."""
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


# --- KEDA CRD schemas ---------------------------------------------------------------------------


def keda_schemas(folder: Path = KEDA_CRDS) -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> openAPIV3Schema, for every version the CRDs in `folder` serve (default: the KEDA CRDs
    of /work/shared/ref/keda; CERT_MANAGER_CRDS holds cert-manager's Certificate)."""
    schemas: dict[tuple[str, str], Obj] = {}
    for path in sorted(folder.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected, as the API server's strict field validation does: an
    object that lists its properties and does not preserve unknown fields gets additionalProperties false."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


# --- policy checks (each returns a list of violations; empty = compliant) --------------------------

_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _effective(spec: Obj, container: Obj, key: str) -> Any:
    return (container.get("securityContext") or {}).get(key, (spec.get("securityContext") or {}).get(key))


def security_violations(objs: list[Obj]) -> list[str]:
    """Our container baseline: non-root, no privilege escalation, all capabilities dropped, RuntimeDefault
    seccomp, a read-only root filesystem with an emptyDir at /tmp."""
    out = []
    for obj, spec in workloads(objs):
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            where = f"{name(obj)} container {c['name']}"
            sc = c.get("securityContext") or {}
            if _effective(spec, c, "runAsNonRoot") is not True:
                out.append(f"{where}: runAsNonRoot is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{where}: readOnlyRootFilesystem is not true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                out.append(f"{where}: capabilities do not drop ALL")
            if (_effective(spec, c, "seccompProfile") or {}).get("type") != "RuntimeDefault":
                out.append(f"{where}: seccompProfile is not RuntimeDefault")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or tmp[0]["name"] not in empty_dirs:
                out.append(f"{where}: no emptyDir mounted at /tmp")
    return out


def restricted_pss_violations(objs: list[Obj]) -> list[str]:
    """The Pod Security Standard "restricted" profile (what the namespace label enforces)."""
    out = []
    for obj, spec in workloads(objs):
        where = name(obj)
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                out.append(f"{where}: {flag}")
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= _RESTRICTED_VOLUMES:
                out.append(f"{where}: volume {volume['name']} of type {sorted(kinds)}")
        pod_sc = spec.get("securityContext") or {}
        if pod_sc.get("runAsUser") == 0:
            out.append(f"{where}: pod runAsUser 0")
        if pod_sc.get("sysctls"):
            out.append(f"{where}: sysctls")
        for c in containers(spec):
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                out.append(f"{cw}: privileged")
            if any(p.get("hostPort") for p in c.get("ports", [])):
                out.append(f"{cw}: hostPort")
            added = set((sc.get("capabilities") or {}).get("add") or [])
            if not added <= {"NET_BIND_SERVICE"}:
                out.append(f"{cw}: adds capabilities {sorted(added)}")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                out.append(f"{cw}: capabilities do not drop ALL")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{cw}: allowPrivilegeEscalation is not false")
            if _effective(spec, c, "runAsNonRoot") is not True:
                out.append(f"{cw}: runAsNonRoot is not true")
            if sc.get("runAsUser") == 0:
                out.append(f"{cw}: runAsUser 0")
            seccomp = (_effective(spec, c, "seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                out.append(f"{cw}: seccompProfile {seccomp}")
            if sc.get("procMount", "Default") != "Default":
                out.append(f"{cw}: procMount {sc['procMount']}")
    return out


def _required_pool(spec: Obj, key: str) -> set[str]:
    """Pool values a pod is pinned to through nodeSelector or required node affinity on `key`."""
    pools = set()
    if key in (spec.get("nodeSelector") or {}):
        pools.add(spec["nodeSelector"][key])
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in required.get("nodeSelectorTerms", []):
        for expr in term.get("matchExpressions", []):
            if expr["key"] == key and expr["operator"] == "In":
                pools.update(expr["values"])
    return pools


def _gpu_limit(c: Obj) -> int:
    return int(((c.get("resources") or {}).get("limits") or {}).get(GPU, 0))


def gpu_violations(objs: list[Obj], expected: dict[str, str], key: str = POOL_KEY) -> list[str]:
    """Every GPU workload (expected by name, or asking for a GPU) is pinned to its pool, tolerates the
    nvidia.com/gpu NoSchedule taint and has a GPU limit."""
    out = []
    seen = set()
    for obj, spec in workloads(objs):
        wname = obj["metadata"]["name"]
        wants_gpu = any(_gpu_limit(c) for c in containers(spec))
        if wname not in expected and not wants_gpu:
            continue
        seen.add(wname)
        where = name(obj)
        pools = _required_pool(spec, key)
        want = expected.get(wname)
        if not pools:
            out.append(f"{where}: not pinned to a node pool via {key}")
        elif want is not None and pools != {want}:
            out.append(f"{where}: pinned to {sorted(pools)}, expected {want}")
        tolerated = any(
            t.get("key") == GPU
            and t.get("effect") in ("NoSchedule", None)
            and (t.get("operator") == "Exists" or (t.get("operator", "Equal") == "Equal" and "value" in t))
            for t in spec.get("tolerations", [])
        )
        if not tolerated:
            out.append(f"{where}: does not tolerate the {GPU} NoSchedule taint")
        if not any(_gpu_limit(c) >= 1 for c in spec.get("containers", [])):
            out.append(f"{where}: no {GPU} limit")
    out += [f"Deployment/{missing}: GPU workload not rendered" for missing in sorted(set(expected) - seen)]
    return out


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def probe_violations(objs: list[Obj]) -> list[str]:
    """Every Service's pods answer gRPC health probes: a gRPC readiness probe on a port the Service
    routes to; pony servers probe `liveness` and `readiness` on their own gRPC port, or, when they serve TLS
    (PONY_TLS_CERT), on their plaintext health-only port (PONY_HEALTH_PORT, a containerPort): kubelet gRPC probes
    speak no TLS."""
    out = []
    pods = list(workloads(objs))
    for svc in of_kind(objs, "Service"):
        selector = svc["spec"].get("selector") or {}
        backing = [(o, s) for o, s in pods if _selects(selector, pod_labels(o))]
        if not backing:
            out.append(f"{name(svc)}: selects no pods")
        for obj, spec in backing:
            container_ports = {
                p.get("name"): p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])
            }
            routed = {
                container_ports.get(p["targetPort"], p["targetPort"]) if "targetPort" in p else p["port"]
                for p in svc["spec"]["ports"]
            }
            for c in spec["containers"]:
                where = f"{name(svc)} -> {name(obj)} container {c['name']}"
                ready = (c.get("readinessProbe") or {}).get("grpc")
                live = c.get("livenessProbe")
                port = GRPC_PORTS.get(obj["metadata"]["name"])
                if port is not None and container_setting(objs, c, "PONY_TLS_CERT"):
                    health = container_setting(objs, c, "PONY_HEALTH_PORT") or ""
                    if not health.isdigit() or int(health) == 0:
                        out.append(f"{where}: serves TLS without a plaintext PONY_HEALTH_PORT for the probes")
                        continue
                    port = int(health)
                    if port not in container_ports.values():
                        out.append(f"{where}: health port {port} is no containerPort")
                elif not ready or ready.get("port") not in routed:
                    out.append(f"{where}: no gRPC readiness probe on a port the Service routes to")
                if not live:
                    out.append(f"{where}: no liveness probe")
                if port is None:
                    continue
                expected = {
                    "readinessProbe": {"port": port, "service": "readiness"},
                    "livenessProbe": {"port": port, "service": "liveness"},
                }
                if "startupProbe" in c:  # a startup probe on the TLS port would never pass either
                    expected["startupProbe"] = {"port": port, "service": "liveness"}
                for probe, want in expected.items():
                    if (c.get(probe) or {}).get("grpc") != want:
                        out.append(f"{where}: {probe} is not grpc {want}")
    return out


WORKER_PROBE = ["ponyctl", "worker", "--probe"]


def container_setting(objs: list[Obj], container: Obj, key: str) -> str | None:
    """The value a container sees for environment variable `key`: its own `env` entry, else the first ConfigMap of
    its `envFrom` that has it (None: unset, or set from a Secret or a field)."""
    for entry in container.get("env", []):
        if entry["name"] == key:
            return entry.get("value")
    maps = {cm["metadata"]["name"]: cm.get("data") or {} for cm in of_kind(objs, "ConfigMap")}
    for source in container.get("envFrom", []):
        data = maps.get((source.get("configMapRef") or {}).get("name", ""), {})
        if key in data:
            return data[key]
    return None


def worker_probe_violations(objs: list[Obj]) -> list[str]:
    """Every Celery worker container has exec liveness and readiness probes running `ponyctl worker --probe`, and
    the heartbeat file that probe reads (PONY_WORKER_HEARTBEAT_FILE, default <PONY_STATE_DIR>/worker.heartbeat)
    lies on an emptyDir, since the root filesystem is read-only."""
    out = []
    for obj, spec in workloads(objs):
        if pod_labels(obj).get("app.kubernetes.io/component") != "worker":
            continue
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec["containers"]:
            where = f"{name(obj)} container {c['name']}"
            for probe in ("livenessProbe", "readinessProbe"):
                command = ((c.get(probe) or {}).get("exec") or {}).get("command")
                if not command:
                    out.append(f"{where}: no exec {probe}")
                elif command[: len(WORKER_PROBE)] != WORKER_PROBE:
                    out.append(f"{where}: {probe} runs {command}, not {' '.join(WORKER_PROBE)}")
            heartbeat = container_setting(objs, c, "PONY_WORKER_HEARTBEAT_FILE") or ""
            if not heartbeat:
                state_dir = container_setting(objs, c, "PONY_STATE_DIR") or ".pony"
                heartbeat = f"{state_dir.rstrip('/')}/worker.heartbeat"
            writable = [
                m["mountPath"].rstrip("/") + "/"
                for m in c.get("volumeMounts", [])
                if m["name"] in empty_dirs and not m.get("readOnly")
            ]
            if not any(heartbeat.startswith(mount) for mount in writable):
                out.append(f"{where}: heartbeat {heartbeat} is not on a writable emptyDir")
    return out


# --- bearer tokens and TLS ---------------------------------------------------------------------------

# Settings that would carry a token's value: never set in the manifests (an empty one in prod would be no token;
# a real one would be a secret in git). Tokens are files from Secret pony-auth.
TOKEN_VALUE_SETTINGS = ("PONY_AUTH_TOKEN", "PONY_AUTH_TOKENS", "PONY_CLIENT_TOKEN")
AUTH_SECRET, TLS_SECRET = "pony-auth", "pony-tls"
ROLES = ("admin", "worker", "generate")
# The role each client's token has: the trainer publishes versions (LoadVersion), the sampler checks its outputs
# with the safety service, the workers run the curation stages and the generate queue.
CLIENT_ROLES = {"trainer": "admin", "sampler": "worker", **{f"worker-{q}": "worker" for q in QUEUES}}


def _is_secret(volume_secret: str, wanted: str) -> bool:
    # kustomize's secretGenerator (dev) appends a content hash to the name.
    return volume_secret == wanted or volume_secret.startswith(f"{wanted}-")


def secret_keys_at(spec: Obj, container: Obj, path: str, secret: str) -> set[str] | None:
    """The keys of Secret `secret` a container reads at `path` (a mounted Secret folder: every key it projects, "*"
    for all; a file in it: that file's key), or None when `path` is not on a volume of that Secret."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path != root and not path.startswith(root + "/"):
            continue
        source = volumes.get(mount["name"], {}).get("secret")
        if not source or not _is_secret(source.get("secretName", ""), secret):
            return None
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        rel = path[len(root) :].strip("/")
        if not rel:
            return set(items.values()) if items else {"*"}
        if items:
            return {items[rel]} if rel in items else set()
        return {rel}
    return None


def _pony_containers(objs: list[Obj]) -> Iterator[tuple[Obj, Obj, Obj]]:
    for obj, spec in workloads(objs):
        if pod_labels(obj).get("app.kubernetes.io/component") in ("grpc-service", "worker"):
            for c in spec["containers"]:
                yield obj, spec, c


def auth_violations(objs: list[Obj]) -> list[str]:
    """Every gRPC service reads its tokens (PONY_AUTH_TOKENS_FILE) from the whole of Secret pony-auth; each client
    (the trainer, the sampler, every worker) sends the token of its role from a file of that Secret
    (PONY_CLIENT_TOKEN_FILE); a worker pod sees no other key; no token value, empty or not, is set in the
    manifests."""
    out = []
    for obj, spec, c in _pony_containers(objs):
        where = f"{name(obj)} container {c['name']}"
        for key in TOKEN_VALUE_SETTINGS:
            value = container_setting(objs, c, key)
            if value is not None:
                kind = "an empty token: no auth" if not value.strip() else "a token in the manifests"
                out.append(f"{where}: {key} is {kind}; tokens are files from Secret {AUTH_SECRET}")
        workload = obj["metadata"]["name"]
        if pod_labels(obj).get("app.kubernetes.io/component") == "grpc-service":
            path = container_setting(objs, c, "PONY_AUTH_TOKENS_FILE")
            keys = secret_keys_at(spec, c, path, AUTH_SECRET) if path else None
            if keys is None or not ({"*"} & keys or set(ROLES) <= keys):
                out.append(f"{where}: PONY_AUTH_TOKENS_FILE={path} is not the mounted Secret {AUTH_SECRET}")
        role = CLIENT_ROLES.get(workload)
        if role is not None:
            path = container_setting(objs, c, "PONY_CLIENT_TOKEN_FILE")
            keys = secret_keys_at(spec, c, path, AUTH_SECRET) if path else None
            if keys != {role}:
                out.append(f"{where}: PONY_CLIENT_TOKEN_FILE={path} is not key {role} of Secret {AUTH_SECRET}")
        if workload.startswith("worker-"):
            for volume in spec.get("volumes", []):
                source = volume.get("secret") or {}
                if _is_secret(source.get("secretName", ""), AUTH_SECRET):
                    projected = {i["key"] for i in source.get("items", [])} or {"*"}
                    if projected != {"worker"}:
                        out.append(f"{name(obj)}: volume {volume['name']} gives a worker keys {sorted(projected)}")
    return out


def tls_violations(objs: list[Obj]) -> list[str]:
    """Every gRPC service serves TLS with tls.crt/tls.key of Secret pony-tls (and has a plaintext health port for
    its probes: see probe_violations); every pony container trusts ca.crt of that Secret (PONY_TLS_CA); workers
    see no private key."""
    out = []
    for obj, spec, c in _pony_containers(objs):
        where = f"{name(obj)} container {c['name']}"
        server = pod_labels(obj).get("app.kubernetes.io/component") == "grpc-service"
        wanted = {
            "PONY_TLS_CA": "ca.crt",
            **({"PONY_TLS_CERT": "tls.crt", "PONY_TLS_KEY": "tls.key"} if server else {}),
        }
        for key, secret_key in wanted.items():
            path = container_setting(objs, c, key)
            keys = secret_keys_at(spec, c, path, TLS_SECRET) if path else None
            if keys is None or not ({"*", secret_key} & keys):
                out.append(f"{where}: {key}={path} is not {secret_key} of the mounted Secret {TLS_SECRET}")
        if server and not (container_setting(objs, c, "PONY_HEALTH_PORT") or "").strip("0"):
            out.append(f"{where}: no PONY_HEALTH_PORT: its probes would have to speak TLS")
        if not server:
            for volume in spec.get("volumes", []):
                source = volume.get("secret") or {}
                if _is_secret(source.get("secretName", ""), TLS_SECRET):
                    projected = {i["key"] for i in source.get("items", [])} or {"*"}
                    if projected != {"ca.crt"}:
                        out.append(f"{name(obj)}: volume {volume['name']} gives a worker keys {sorted(projected)}")
    return out


# --- KEDA on Redis ---------------------------------------------------------------------------------


def redis_priority_lists(queue: str) -> list[str]:
    """The Redis lists kombu's transport puts messages of `queue` in, one per priority step, for priorities 0..9:
    kombu's own `Channel._q_for_pri` on a channel that is not connected (its steps and separator are class
    attributes; transport options could change them, and the pony app sets none)."""
    from kombu.transport.redis import Channel

    channel = Channel.__new__(Channel)
    return list(dict.fromkeys(channel._q_for_pri(queue, priority) for priority in range(10)))


def formula_sum_terms(formula: str) -> list[str]:
    """The trigger names a scalingModifiers formula adds up; ValueError if it is anything but a plain sum."""
    terms = [term.strip() for term in formula.split("+")]
    if not all(term.isidentifier() for term in terms):
        raise ValueError(f"not a plain sum of trigger names: {formula!r}")
    return terms


def image_tag_violations(found: dict[str, str]) -> list[str]:
    """Images neither pinned by digest nor tagged (or tagged latest)."""
    out = []
    for ref, where in sorted(found.items()):
        tag = image_tag(ref)
        if "@sha256:" in ref and tag != "latest":
            continue
        if tag is None:
            out.append(f"{where}: image {ref} has no tag")
        elif tag == "latest":
            out.append(f"{where}: image {ref} uses the latest tag")
    return out


# What the trainer controller calls (tests/trainer/test_controller_kubernetes.py derives it from the requests
# the controller makes against kmock and compares it with the Role as well).
ALLOWED_TRAINER_RULES = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "services"): {"create", "delete"},
    ("", "persistentvolumeclaims"): {"create"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}
CLUSTER_SCOPED_KINDS = ("Namespace", "PriorityClass")


def rbac_violations(objs: list[Obj]) -> list[str]:
    """The trainer's RBAC is namespaced (Role + RoleBinding + ServiceAccount) and grants only what the
    controller calls: Jobs, the Services and PVCs of a run (create, and delete for Services), Pods (list)
    and their logs (get)."""
    out = [f"{name(o)}: cluster-scoped RBAC" for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = of_kind(objs, "Role")
    if [r["metadata"]["name"] for r in roles] != ["trainer"]:
        out.append(f"expected exactly Role/trainer, got {[name(r) for r in roles]}")
    for role in roles:
        for rule in role.get("rules", []):
            if rule.get("resourceNames") or rule.get("nonResourceURLs"):
                out.append(f"{name(role)}: unexpected rule {rule}")
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    allowed = ALLOWED_TRAINER_RULES.get((group, resource))
                    if allowed is None:
                        out.append(f"{name(role)}: grants {group or 'core'}/{resource}")
                        continue
                    extra = set(rule.get("verbs", [])) - allowed
                    if extra:
                        out.append(f"{name(role)}: {group or 'core'}/{resource} verbs {sorted(extra)}")
    bindings = of_kind(objs, "RoleBinding")
    if len(bindings) != 1:
        out.append(f"expected one RoleBinding, got {[name(b) for b in bindings]}")
    for binding in bindings:
        ns = binding["metadata"].get("namespace")
        if binding["roleRef"] != {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trainer"}:
            out.append(f"{name(binding)}: roleRef {binding['roleRef']}")
        if binding.get("subjects") != [{"kind": "ServiceAccount", "name": "trainer", "namespace": ns}]:
            out.append(f"{name(binding)}: subjects {binding.get('subjects')}")
    for obj, spec in workloads(objs):
        account = spec.get("serviceAccountName", "default")
        token = spec.get("automountServiceAccountToken")
        if obj["metadata"]["name"] == "trainer":
            if account != "trainer" or token is not True:
                out.append(f"{name(obj)}: must run as ServiceAccount trainer with its token")
        elif account == "trainer" or token is not False:
            out.append(f"{name(obj)}: gets an API token (serviceAccount {account}, automount {token})")
    return out


# --- NetworkPolicy evaluation (same-namespace pods and external endpoints) --------------------------


def _match_selector(selector: Obj, labels: dict[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def _peer_matches(peer: Obj, labels: dict[str, str] | None) -> bool:
    """`labels` None = an endpoint outside the cluster; else a pod in the policy's own namespace."""
    if labels is None:
        return "ipBlock" in peer
    if "ipBlock" in peer or "namespaceSelector" in peer:
        return False
    return _match_selector(peer.get("podSelector") or {}, labels)


def _port_matches(rule: Obj, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports)


def _direction_allows(policies: list[Obj], direction: str, pod: dict[str, str], peer, port: int) -> bool:
    selecting = [
        p
        for p in policies
        if direction in p["spec"].get("policyTypes", ["Ingress"]) and _match_selector(p["spec"]["podSelector"], pod)
    ]
    if not selecting:
        return True
    key = "ingress" if direction == "Ingress" else "egress"
    peers = "from" if direction == "Ingress" else "to"
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            if _port_matches(rule, port) and (peers not in rule or any(_peer_matches(p, peer) for p in rule[peers])):
                return True
    return False


def traffic_allowed(objs: list[Obj], src: dict[str, str], dst: dict[str, str] | None, port: int) -> bool:
    """Whether the NetworkPolicies let a pod labelled `src` open TCP `port` on `dst` (None = external)."""
    policies = of_kind(objs, "NetworkPolicy")
    egress = _direction_allows(policies, "Egress", src, dst, port)
    ingress = dst is None or _direction_allows(policies, "Ingress", dst, src, port)
    return egress and ingress


def labels_of(objs: list[Obj], workload: str) -> dict[str, str]:
    return pod_labels(find(objs, "Deployment", workload))


def literal_occurrences(text_root: Path, needle: str) -> dict[str, int]:
    """Files under `text_root` that contain `needle`, with their counts (YAML, env and Dockerfiles)."""
    hits = {}
    for path in sorted(text_root.rglob("*")):
        if path.is_file():
            count = len(re.findall(re.escape(needle), path.read_text(errors="replace")))
            if count:
                hits[str(path.relative_to(text_root))] = count
    return hits
