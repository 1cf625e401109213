"""Runs a rendered Pod's containers with docker the way the kubelet runs them: same image, command, args, env (from
its ConfigMaps and Secrets), security context, resources and volumes, on the host network; plus its probes."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.deploy.manifests import Obj, find, of_kind, pod_spec

DOCKER = os.environ.get("PONY_DOCKER") or shutil.which("docker") or "docker"
LABEL = "pony.test/containers"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def docker(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def docker_up() -> bool:
    try:
        return docker("info", check=False, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory(quantity: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, unit in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + unit
    return quantity


@dataclass
class Cluster:
    """What the kubelet would find in the cluster: the rendered objects with this machine's values in place of
    the in-cluster ones (ConfigMap and Secret keys overridden, PersistentVolumeClaims bound to host folders)."""

    objs: list[Obj]
    work: Path  # where Secret volumes are written
    tag: str
    config: dict[str, str] = field(default_factory=dict)  # pony-config keys replaced
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # Secret name (ungenerated) -> keys replaced
    claims: dict[str, Path] = field(default_factory=dict)  # PVC name -> host folder
    ports: dict[int, int] = field(default_factory=dict)  # container port -> free host port

    def _generated(self, kind: str, ref: str) -> Obj:
        """A generated ConfigMap/Secret by its hashed name (pony-config-abc123) or its base name."""
        for obj in of_kind(self.objs, kind):
            name = obj["metadata"]["name"]
            if name == ref or re.fullmatch(re.escape(ref) + r"-[a-z0-9]{10}", name):
                return obj
        raise KeyError(f"{kind} {ref}")

    @staticmethod
    def _base(name: str) -> str:
        return re.sub(r"-[a-z0-9]{10}$", "", name)

    def config_data(self, ref: str) -> dict[str, str]:
        obj = self._generated("ConfigMap", ref)
        data = dict(obj.get("data") or {})
        if self._base(obj["metadata"]["name"]) == "pony-config":
            data.update(self.config)
        return data

    def secret_data(self, ref: str) -> dict[str, str]:
        obj = self._generated("Secret", ref)
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        data.update(obj.get("stringData") or {})
        data.update(self.secrets.get(self._base(obj["metadata"]["name"]), {}))
        return data

    def port(self, number: int) -> int:
        return self.ports.get(number, number)


@dataclass
class Running:
    """One started container: its docker name, the rendered container and Pod, and when it was started."""

    name: str
    container: Obj
    pod: Obj
    labels: dict[str, str]
    started: float
    env: dict[str, str]

    def logs(self, tail: int = 60) -> str:
        proc = docker("logs", "--tail", str(tail), self.name, check=False)
        return proc.stdout + proc.stderr

    def state(self) -> str:
        state = "exit {{.State.ExitCode}} oom-killed {{.State.OOMKilled}}"
        proc = docker("inspect", "-f", state, self.name, check=False)
        return proc.stdout.strip()

    def running(self) -> bool:
        proc = docker("inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *cmd, check=False, timeout=timeout)


def _expand(text: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(cluster: Cluster, pod: Obj, labels: Mapping[str, str], c: Obj) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in c.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(cluster.config_data(source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(cluster.secret_data(source["secretRef"]["name"]))
    for var in c.get("env") or []:
        if "value" in var:
            env[var["name"]] = _expand(str(var["value"]), env)
            continue
        ref = var.get("valueFrom") or {}
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            match = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            env[var["name"]] = labels[match.group(1)] if match else c["name"]
        elif "secretKeyRef" in ref:
            env[var["name"]] = cluster.secret_data(ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[var["name"]] = cluster.config_data(ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
    return env


def _secret_volume(cluster: Cluster, volume: Obj, fs_group: int | None, folder: Path) -> Path:
    """A Secret volume (or a projected one of Secrets) as files, items and modes honoured, group-owned by fsGroup
    like the kubelet's."""
    if "secret" in volume:
        sources, mode = [volume["secret"]], volume["secret"].get("defaultMode", 0o644)
    else:
        sources = [{"secretName": src["secret"]["name"], **src["secret"]} for src in volume["projected"]["sources"]]
        mode = volume["projected"].get("defaultMode", 0o644)
    folder.mkdir(parents=True, exist_ok=True)
    for spec in sources:
        data = cluster.secret_data(spec["secretName"])
        for item in spec.get("items") or [{"key": k, "path": k} for k in data]:
            path = folder / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]])
            if fs_group is not None:
                os.chown(path, 0, fs_group)
            os.chmod(path, item.get("mode", mode))
    os.chmod(folder, 0o755)
    return folder


def run_args(
    cluster: Cluster,
    workload: Obj,
    c: Obj,
    name: str,
    env_overrides: Mapping[str, str] | None = None,
    detach: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """The `docker run` arguments for container `c` of `workload`'s Pod, and the environment it gets."""
    pod = pod_spec(workload) or {}
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    psc = pod.get("securityContext") or {}
    csc = c.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    fs_group = psc.get("fsGroup")
    # Each Pod has its own hostname (its name): Celery names its worker node by it.
    args = ["run", "--name", name, "--hostname", name, "--label", f"{LABEL}=1", "--network", "host"]
    args += ["-d"] if detach else ["--rm"]
    if uid is not None:
        args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if fs_group is not None:
        args += ["--group-add", str(fs_group)]
    if csc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if csc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in (csc.get("capabilities") or {}).get("drop") or []:
        args += ["--cap-drop", cap]
    for cap in (csc.get("capabilities") or {}).get("add") or []:
        args += ["--cap-add", cap]
    limits = (c.get("resources") or {}).get("limits") or {}
    if "cpu" in limits:
        args += ["--cpus", str(cpus(str(limits["cpu"])))]
    if "memory" in limits:
        args += ["--memory", memory(str(limits["memory"]))]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for mount in c.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        ro = ",readonly" if mount.get("readOnly") else ""
        target = mount["mountPath"]
        if "emptyDir" in volume:
            if mount["name"] in cluster.claims:  # shared with an init container: a host folder
                args += ["--mount", f"type=bind,source={cluster.claims[mount['name']]},target={target}{ro}"]
            else:
                args += ["--tmpfs", f"{target}:rw,exec,mode=1777"]
        elif "secret" in volume or all("secret" in src for src in volume.get("projected", {}).get("sources", [{}])):
            folder = _secret_volume(cluster, volume, fs_group, cluster.work / name / mount["name"])
            args += ["--mount", f"type=bind,source={folder},target={target},readonly"]
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            args += ["--mount", f"type=bind,source={cluster.claims[claim]},target={target}{ro}"]
        else:
            raise NotImplementedError(f"volume {mount['name']}: {sorted(volume)}")
    env = container_env(cluster, pod, labels, c)
    if pod.get("automountServiceAccountToken", True) and pod.get("serviceAccountName"):
        # What the kubelet gives such a Pod: its token folder and the API's address (here nothing answers there:
        # no test needs the API server; the trainer controller only reaches it when a run is submitted).
        folder = cluster.work / name / "serviceaccount"
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in (("token", "not-a-real-token"), ("namespace", "pony"), ("ca.crt", "no API server here\n")):
            (folder / key).write_text(value)
        args += ["--mount", f"type=bind,source={folder},target={SERVICE_ACCOUNT},readonly"]
        env |= {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(cluster.port(443))}
    env.update(env_overrides or {})
    env_file = cluster.work / f"{name}.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    args += ["--env-file", str(env_file)]
    command = [_expand(str(x), env) for x in c.get("command") or []]
    cargs = [_remap(_expand(str(x), env), cluster) for x in c.get("args") or []]
    if command:
        args += ["--entrypoint", command[0]]
    image = c["image"] if ":" in c["image"] else f"{c['image']}:{cluster.tag}"
    args.append(image)
    args += command[1:] + cargs
    return args, env


def _remap(arg: str, cluster: Cluster) -> str:
    """`--http-port=8000` -> the free host port standing for container port 8000 (all Pods share one network)."""
    match = re.fullmatch(r"(--[a-z-]+port=)(\d+)", arg)
    return f"{match.group(1)}{cluster.port(int(match.group(2)))}" if match else arg


def start(
    cluster: Cluster,
    deployment: str,
    env_overrides: Mapping[str, str] | None = None,
    skip_init: tuple[str, ...] = (),
) -> Running:
    """Starts the Deployment's main container (detached) after running its init containers (but `skip_init`, whose
    output the test provides) to completion, each with its own security context."""
    workload = find(cluster.objs, "Deployment", deployment)
    pod = pod_spec(workload) or {}
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    name = f"pony-ct-{deployment}"
    for init in pod.get("initContainers") or []:
        if init["name"] in skip_init:
            continue
        args, _ = run_args(cluster, workload, init, f"{name}-init-{init['name']}", env_overrides, detach=False)
        proc = docker(*args, check=False, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"init container {init['name']} of {deployment} failed: {proc.stderr[-2000:]}")
    main = pod["containers"][0]
    args, env = run_args(cluster, workload, main, name, env_overrides)
    t0 = time.monotonic()
    docker(*args)
    return Running(name, main, pod, labels, t0, env)


def remove_all() -> None:
    """Removes every container these tests started (by label), running or not."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False, timeout=180)


def probe(run: Running, cluster: Cluster, spec: Obj) -> bool:
    """One run of a Kubernetes probe (grpc, httpGet or exec) against the running container."""
    if "grpc" in spec:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        target = f"127.0.0.1:{cluster.port(int(spec['grpc']['port']))}"
        with grpc.insecure_channel(target) as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")), timeout=5
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    if "httpGet" in spec:
        url = f"http://127.0.0.1:{cluster.port(int(spec['httpGet']['port']))}{spec['httpGet'].get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return 200 <= resp.status < 400
        except OSError:
            return False
    if "exec" in spec:
        return run.exec(*spec["exec"]["command"], timeout=spec.get("timeoutSeconds", 10) + 30).returncode == 0
    raise NotImplementedError(sorted(spec))


def wait_all(runs: list[Running], cluster: Cluster, timeout: float) -> dict[str, float]:
    """Readiness of every container (polled round-robin, so each time is measured from its own start)."""
    pending = {r.name: r for r in runs}
    ready: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, run in list(pending.items()):
            spec = run.container["readinessProbe"]
            if probe(run, cluster, spec):
                ready[key] = time.monotonic() - run.started
                del pending[key]
            elif not run.running():
                raise AssertionError(f"{run.name} exited before it was ready ({run.state()}):\n{run.logs()}")
        time.sleep(1.0)
    if pending:
        details = "\n".join(f"--- {r.name}\n{r.logs(30)}" for r in pending.values())
        raise AssertionError(f"not ready after {timeout:.0f} s: {sorted(pending)}\n{details}")
    return ready


def inspect(name: str) -> dict[str, Any]:
    return json.loads(docker("inspect", name).stdout)[0]


def image_size(image: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout.strip())
