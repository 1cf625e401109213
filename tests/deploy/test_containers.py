"""Every container of the dev overlay run from the built images exactly as its Pod runs it (uid 10001, read-only
root, a tmpfs at /tmp, no capabilities, no new privileges, tiny models read-only, Secrets as files), on the host
network on loopback with this machine's PostgreSQL, RabbitMQ and Redis: the gRPC services reach SERVING, the
curation workers curate a batch, the sampler drives its tritonserver to an image, and no image keeps the build's
CA or pip configuration. `make images-test` runs it (PONY_CONTAINER_TESTS=1); skipped otherwise."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pony_common.config import Settings
from tests.conftest import REDIS_HOST, free_port, fresh_postgres_database, require
from tests.deploy import containers as ct
from tests.deploy.manifests import GRPC_PORTS, render

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        os.environ.get("PONY_CONTAINER_TESTS") != "1",
        reason="run by `make images-test` (PONY_CONTAINER_TESTS=1): they need dockerd and the built images",
    ),
    pytest.mark.timeout(1800),
]

TAG = os.environ.get("PONY_IMAGE_TAG", "0.1.0")
IMAGES = (f"pony-platform/cpu:{TAG}", f"pony-platform/triton:{TAG}")
SERVICES = tuple(GRPC_PORTS)  # captioner, scorer, style-tagger, safety, trainer, sampler
WORKERS = ("worker-caption", "worker-score", "worker-style", "worker-safety", "worker-persist")
TRITON_PORTS = (8000, 8001, 8002)
UID = 10001
READY_TIMEOUT_S = 900
REPORT = Path(os.environ.get("PONY_CONTAINER_REPORT", "/tmp/pony-images/readiness.json"))


@dataclass
class Stack:
    cluster: ct.Cluster
    runs: dict[str, ct.Running]  # Deployment name -> its running main container
    ready: dict[str, float]  # Deployment name -> seconds from `docker run` to its readiness probe passing
    settings: Settings  # the same catalog, broker and blobs, seen from this machine


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of its own (guest may use it), deleted afterwards: no other test sees our queues."""
    require("RabbitMQ", "127.0.0.1", 5672)
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("rabbitmqctl is not installed: the container tests isolate their queues in a virtual host")
    vhost = f"pony-containers-{uuid.uuid4().hex[:8]}"
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=120)
    try:
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], check=False, capture_output=True, timeout=120)


@contextmanager
def redis_database() -> Iterator[str]:
    require("Redis", *REDIS_HOST)
    import redis

    db = 1 + (os.getpid() + 7) % 15
    client = redis.Redis(host=REDIS_HOST[0], port=REDIS_HOST[1], db=db)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST[0]}:{REDIS_HOST[1]}/{db}"
    finally:
        client.flushdb()
        client.close()


def _volume(path: Path, owner: int | None = None) -> Path:
    """A host folder standing for a PersistentVolume: owned by the Pods' fsGroup, group-writable, setgid."""
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, owner, owner)
        os.chmod(path, 0o2775)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    if not ct.docker_up():
        pytest.fail("docker is not running (`make images-test` starts dockerd and builds the images)")
    for image in IMAGES:
        if ct.docker("image", "inspect", image, check=False).returncode != 0:
            pytest.fail(f"image {image} is not built: run `make images`")
    work = tmp_path_factory.mktemp("containers")
    os.chmod(work, 0o755)
    for folder in (tiny_models, *tiny_models.rglob("*")):
        os.chmod(folder, os.stat(folder).st_mode | 0o555 if folder.is_dir() else os.stat(folder).st_mode | 0o444)
    ports = {port: free_port() for port in (*GRPC_PORTS.values(), *TRITON_PORTS, 443)}  # 443: the API server
    with fresh_postgres_database("pony_containers") as db, rabbitmq_vhost() as broker, redis_database() as results:
        config = {f"PONY_{s.upper().replace('-', '_')}_ADDR": f"127.0.0.1:{ports[p]}" for s, p in GRPC_PORTS.items()}
        # Loopback only: every Pod shares this machine's network, so each listens on 127.0.0.1 on a port of its own.
        config |= {"PONY_TRITON_URL": f"127.0.0.1:{ports[8001]}", "PONY_BIND_HOST": "127.0.0.1"}
        # Twelve Pods share this machine's cores (two on CI, with other work): a batch may take minutes to caption.
        config |= {"PONY_RPC_TIMEOUT_S": "600"}
        cluster = ct.Cluster(
            objs=render("dev"),
            work=work,
            tag=TAG,
            config=config,
            secrets={
                "pony-database": {"PONY_DATABASE_URL": db},
                "pony-broker": {"PONY_BROKER_URL": broker, "PONY_RESULT_BACKEND": results},
            },
            claims={
                "pony-blobs": _volume(work / "blobs", UID),
                "pony-triton-repo": _volume(work / "triton-repo", UID),
                "pony-checkpoints": _volume(work / "checkpoints", UID),
                "models": tiny_models,  # the models-tiny init container's emptyDir: built here, mounted read-only
            },
            ports=ports,
        )
        settings = Settings.from_env(
            {k: v for k, v in config.items() if k != "PONY_BIND_HOST"},
            state_dir=str(work / "host-state"),
            database_url=db,
            broker_url=broker,
            result_backend=results,
            blob_url=str(work / "blobs"),
            models_dir=str(tiny_models),
        )
        runs: dict[str, ct.Running] = {}
        try:
            # Triton first: its init container renders the model repository the sampler loads pony_v7 from.
            runs["triton"] = ct.start(cluster, "triton", skip_init=("models-tiny",))
            for deployment in (*SERVICES, *WORKERS):
                metrics = {"PONY_METRICS_PORT": str(free_port())}
                runs[deployment] = ct.start(cluster, deployment, metrics, skip_init=("models-tiny",))
            by_name = {run.name: key for key, run in runs.items()}
            ready = {by_name[n]: s for n, s in ct.wait_all(list(runs.values()), cluster, READY_TIMEOUT_S).items()}
            REPORT.parent.mkdir(parents=True, exist_ok=True)
            REPORT.write_text(json.dumps({k: round(v, 1) for k, v in sorted(ready.items())}, indent=1))
            yield Stack(cluster, runs, ready, settings)
        finally:
            ct.remove_all()


def test_every_container_reaches_readiness(stack: Stack) -> None:
    # gRPC services: grpc.health.v1 `readiness` SERVING (model loaded); Triton: its gRPC health; workers: the
    # heartbeat probe (`ponyctl worker --probe`) inside the container, as the kubelet runs them.
    assert set(stack.ready) == {"triton", *SERVICES, *WORKERS}
    for name, run in stack.runs.items():
        assert run.running(), f"{name} stopped:\n{run.logs()}"


def test_containers_honour_the_restricted_profile(stack: Stack) -> None:
    for name, run in stack.runs.items():
        assert run.exec("id", "-u").stdout.strip() == str(UID), name
        denied = run.exec("sh", "-c", "echo x > /written-to-root")
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (name, denied.stderr)
        for path in ("/app", "/opt/venv", "/etc"):
            assert run.exec("touch", f"{path}/written").returncode != 0, (name, path)
        assert run.exec("sh", "-c", "echo x > /tmp/written && rm /tmp/written").returncode == 0, name
        status = run.exec("cat", "/proc/self/status").stdout
        caps = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert int(caps["CapEff"], 16) == 0 and int(caps["CapBnd"], 16) == 0, (name, caps["CapBnd"])
        assert caps["NoNewPrivs"].strip() == "1", name
        config = ct.inspect(run.name)["HostConfig"]
        assert config["ReadonlyRootfs"] and config["CapDrop"] == ["ALL"], name
        if any(m["mountPath"] == "/models" for m in run.container["volumeMounts"]):
            assert run.exec("touch", "/models/written").returncode != 0, name
        # Secrets are files the Pod's group may read; none is in the environment.
        environ = run.exec("cat", "/proc/1/environ").stdout
        assert "PONY_DATABASE_URL=" not in environ and "PONY_BROKER_URL=" not in environ, name


def test_worker_containers_curate_a_batch(stack: Stack, tmp_path: Path) -> None:
    from services.curation.ingest import ingest_source
    from services.curation.samples import write_sample_pool

    cats = ("anime", "furry", "realism")
    pool = write_sample_pool(
        tmp_path / "pool", per_category=1, near_duplicates=0, corrupt=0, blocked=0, size=48, seed=5, categories=cats
    )
    old = os.umask(0o002)  # what this machine writes into the blob volume stays writable for the Pods' group
    try:
        summary = ingest_source(stack.settings, str(pool.root), wait=True, progress=False, timeout_s=600)
    finally:
        os.umask(old)
    assert summary.new >= len(cats)  # one image per category (an exact duplicate shares its original's id)
    assert summary.finished == {"done": summary.new}, summary.finished


def test_sampler_container_drives_triton_to_an_image(stack: Stack) -> None:
    from PIL import Image

    from services.sampler.client import SamplerClient

    token = stack.cluster.secret_data("pony-auth")["generate"]
    client_settings = stack.settings.replace(auth_token=token)
    with SamplerClient(client_settings, timeout=300) as client:
        reply = client.generate("a pony in a meadow", width=64, height=64, steps=4, seed=7)
    assert len(reply.images) == 1
    image = Image.open(io.BytesIO(reply.images[0].png))
    assert image.format == "PNG" and image.size == (64, 64)
    assert reply.provenance.model == "pony_v7"


def _machine_only_certificates(image: str) -> list[bytes]:
    """Certificates this machine trusts that the image's own CA bundle lacks (e.g. a TLS-intercepting proxy's):
    one base64 line from each, what a layer holding the machine's bundle would contain."""
    host = Path(os.environ.get("PONY_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt"))
    if not host.is_file():
        return []
    proc = ct.docker("run", "--rm", "--entrypoint", "cat", image, "/etc/ssl/certs/ca-certificates.crt", check=False)
    own = set(proc.stdout.splitlines())
    lines = []
    for cert in host.read_text().split("-----END CERTIFICATE-----"):
        body = [line for line in cert.splitlines() if len(line) == 64 and not line.startswith("-----")]
        if body and body[len(body) // 2] not in own:
            lines.append(body[len(body) // 2].encode())
    return lines


@pytest.mark.parametrize("image", IMAGES)
def test_images_keep_neither_the_build_ca_nor_the_pip_configuration(image: str) -> None:
    if not ct.docker_up():
        pytest.fail("docker is not running")
    needles = _machine_only_certificates(image)
    proc = ct.docker("run", "--rm", "--entrypoint", "sh", image, "-c", "test ! -e /etc/pip.conf && echo clean")
    assert proc.stdout.strip() == "clean"
    # Every layer, byte for byte (docker save): no file of any layer holds one of the machine's own certificates.
    save = subprocess.Popen([ct.DOCKER, "save", image], stdout=subprocess.PIPE)
    assert save.stdout is not None
    tail, found = b"", []
    for chunk in iter(lambda: save.stdout.read(1 << 22), b""):
        window = tail + chunk
        found += [n for n in needles if n in window]
        tail = window[-128:]
    assert save.wait() == 0
    assert not found, f"{image} keeps {len(found)} of this machine's CA certificates in a layer"
