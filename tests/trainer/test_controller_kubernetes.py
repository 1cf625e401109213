"""The TrainerController over gRPC against kmock (an HTTP Kubernetes API emulator the official client talks to):
submit creates a pinned Job, Job status drives the run, cancel deletes it, a restarted controller adopts it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from pony.v1 import trainer_pb2, trainer_pb2_grpc
from pony_common.catalog import catalog_for
from pony_common.catalog.models import ModelVersionRow
from pony_common.config import Settings
from pony_common.grpc.client import aio_channel
from pony_common.grpc.server import RunningServer, start_server
from services.trainer.app import create_service
from services.trainer.service import TrainerService
from tests.trainer.conftest import tiny_spec

NS = "pony-train"
pytestmark = pytest.mark.asyncio


@pytest.fixture
def kube_settings(model_settings: Settings, kmock) -> Settings:
    # tiny models readable here: SubmitRun's memory plan (8 GPUs per node) is made for the tiny transformer
    return model_settings.replace(
        trainer_executor="kubernetes",
        trainer_kube_url=str(kmock.url).rstrip("/"),
        trainer_namespace=NS,
        trainer_resync_s=0.5,
        sampler_addr="",  # no sampler: publishing writes the catalog row only
    )


class Controller:
    """A controller behind a real gRPC server on a free port, restartable on the same catalog."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: RunningServer | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> trainer_pb2_grpc.TrainerControllerStub:
        self.controller = TrainerService(self.settings)
        self.running = await start_server(
            self.settings, create_service(self.settings, self.controller), port=0, host="127.0.0.1"
        )
        await self.running.wait_ready(10)
        self.channel = aio_channel(self.settings, f"127.0.0.1:{self.running.port}")
        return trainer_pb2_grpc.TrainerControllerStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.running is not None:
            running, self.running = self.running, None
            await running.server.stop(0)
            await asyncio.to_thread(self.controller.close)


@pytest_asyncio.fixture
async def controller(kube_settings: Settings) -> AsyncIterator[Controller]:
    c = Controller(kube_settings)
    try:
        yield c
    finally:
        await c.stop()


# The test's own API calls (playing the Job controller and the kubelet) carry this user agent, so that the
# requests kmock records can be split into the trainer controller's and the test's.
ACTOR_AGENT = "pony-test-actor"


def batch_api(settings: Settings) -> client.BatchV1Api:
    cfg = client.Configuration()
    cfg.host = settings.trainer.kube_url
    api = client.ApiClient(cfg)
    api.user_agent = ACTOR_AGENT
    return client.BatchV1Api(api)


async def read_job(settings: Settings, name: str) -> dict | None:
    def read() -> dict | None:
        try:
            return json.loads(batch_api(settings).read_namespaced_job(name, NS, _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    return await asyncio.to_thread(read)


async def patch_status(settings: Settings, name: str, status: dict) -> None:
    await asyncio.to_thread(
        batch_api(settings).patch_namespaced_job_status, name, NS, {"status": status}, _preload_content=False
    )


async def wait_state(stub, run_id: str, state: int, timeout: float = 15.0) -> trainer_pb2.Run:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        run = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id))).run
        if run.state == state:
            return run
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"run {run_id} stayed {trainer_pb2.RunState.Name(run.state)}: {run.reason}")
        await asyncio.sleep(0.1)


def spec_yaml(manifest: Path, **overrides) -> str:
    doc = tiny_spec(manifest, **overrides)
    doc["resources"] = {"gpus_per_node": 8, "processes_per_node": 8, **overrides.get("resources", {})}
    return yaml.safe_dump(doc)


async def test_submit_creates_a_pinned_job_and_job_status_drives_the_run(
    controller: Controller, kube_settings: Settings, manifest: Path, kmock
) -> None:
    stub = await controller.start()
    resp = await stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=spec_yaml(manifest), run_id="tiny-1"))
    assert resp.run.state == trainer_pb2.RUN_STATE_PENDING
    assert resp.run.executor == "kubernetes" and resp.run.job_name == "train-tiny-1"
    job = await read_job(kube_settings, "train-tiny-1")
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": kube_settings.trainer.pool_label, "operator": "In", "values": ["training"]}
    ]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "training-job"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert yaml.safe_load(env["PONY_TRAIN_SPEC"])["name"] == "tiny"
    assert [o for o in list(kmock) if "/configmaps" in str(o.url)] == []

    watched: list[trainer_pb2.WatchRunResponse] = []

    async def watch() -> None:
        async for item in stub.WatchRun(trainer_pb2.WatchRunRequest(run_id="tiny-1")):
            watched.append(item)

    watcher = asyncio.create_task(watch())
    # the rank-0 pod and its log: loss lines reach the run's events
    await asyncio.to_thread(
        client.CoreV1Api(batch_api(kube_settings).api_client).create_namespaced_pod,
        NS,
        {"metadata": {"name": "train-tiny-1-0", "namespace": NS, "labels": {"pony.ai/run-id": "tiny-1"}}},
        _preload_content=False,
    )
    kmock[f"get /api/v1/namespaces/{NS}/pods/train-tiny-1-0/log"] << (
        b'{"pony_event": "start", "step": 0}\n{"loss": 0.75, "pony_event": "step", "step": 1}\n'
    )
    await patch_status(kube_settings, "train-tiny-1", {"active": 1, "ready": 1})
    running = await wait_state(stub, "tiny-1", trainer_pb2.RUN_STATE_RUNNING)
    assert "active" in running.reason
    await patch_status(
        kube_settings,
        "train-tiny-1",
        {"active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
    )
    done = await wait_state(stub, "tiny-1", trainer_pb2.RUN_STATE_SUCCEEDED)
    assert done.model_version == 1
    assert done.checkpoint_uri == "/checkpoints/tiny-1/final"
    assert done.step == 1 and done.last_loss == pytest.approx(0.75)
    await asyncio.wait_for(watcher, 10)
    states = [
        i.event.state for i in watched if i.HasField("event") and i.event.kind == trainer_pb2.RUN_EVENT_KIND_STATE
    ]
    assert states == [trainer_pb2.RUN_STATE_PENDING, trainer_pb2.RUN_STATE_RUNNING, trainer_pb2.RUN_STATE_SUCCEEDED]
    losses = [i.event for i in watched if i.HasField("event") and i.event.kind == trainer_pb2.RUN_EVENT_KIND_LOSS]
    assert [(e.step, round(e.loss, 2)) for e in losses] == [(1, 0.75)]
    with catalog_for(kube_settings.database_url).session() as s:
        row = s.get(ModelVersionRow, ("pony_v7", 1))
        assert row is not None and row.source_run_id == "tiny-1" and row.uri == "/checkpoints/tiny-1/final"


async def test_a_failed_job_fails_the_run_with_its_reason(
    controller: Controller, kube_settings: Settings, manifest: Path
) -> None:
    stub = await controller.start()
    await stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=spec_yaml(manifest), run_id="tiny-2"))
    await patch_status(
        kube_settings,
        "train-tiny-2",
        {
            "failed": 1,
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached"}
            ],
        },
    )
    run = await wait_state(stub, "tiny-2", trainer_pb2.RUN_STATE_FAILED)
    assert "BackoffLimitExceeded" in run.reason
    assert not run.HasField("model_version")


async def test_cancel_deletes_the_job_and_its_service(
    controller: Controller, kube_settings: Settings, manifest: Path, kmock
) -> None:
    stub = await controller.start()
    spec = spec_yaml(manifest, resources={"nodes": 2})
    await stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=spec, run_id="tiny-3"))
    job = await read_job(kube_settings, "train-tiny-3")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    core = client.CoreV1Api(batch_api(kube_settings).api_client)
    svc = await asyncio.to_thread(core.read_namespaced_service, "train-tiny-3", NS, _preload_content=False)
    assert json.loads(svc.data)["spec"]["clusterIP"] == "None"
    resp = await stub.CancelRun(
        trainer_pb2.CancelRunRequest(run_id="tiny-3", propagation=trainer_pb2.DELETE_PROPAGATION_FOREGROUND)
    )
    assert resp.run.state == trainer_pb2.RUN_STATE_CANCELLED
    assert await read_job(kube_settings, "train-tiny-3") is None
    with pytest.raises(ApiException) as info:
        await asyncio.to_thread(core.read_namespaced_service, "train-tiny-3", NS)
    assert info.value.status == 404
    deletes = [r for r in list(kmock) if r.method == "DELETE" and "/jobs/" in str(r.url)]
    assert json.loads(deletes[-1].body or b"{}").get("propagationPolicy") == "Foreground"
    # cancelling again leaves it as it is
    again = await stub.CancelRun(trainer_pb2.CancelRunRequest(run_id="tiny-3"))
    assert again.run.state == trainer_pb2.RUN_STATE_CANCELLED


async def test_a_restarted_controller_adopts_the_run_without_a_second_job(
    controller: Controller, kube_settings: Settings, manifest: Path, kmock
) -> None:
    stub = await controller.start()
    await stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=spec_yaml(manifest), run_id="tiny-4"))
    await controller.stop()

    def job_creates() -> int:
        return sum(1 for r in list(kmock) if r.method == "POST" and str(r.url.path).endswith("/jobs"))

    assert job_creates() == 1
    stub = await controller.start()
    await asyncio.sleep(1.5)  # a few resync periods
    await patch_status(kube_settings, "train-tiny-4", {"active": 1})
    await wait_state(stub, "tiny-4", trainer_pb2.RUN_STATE_RUNNING)
    assert job_creates() == 1
    # submitting the same run id again is answered with the existing run, not a new Job
    again = await stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=spec_yaml(manifest), run_id="tiny-4"))
    assert again.run.state == trainer_pb2.RUN_STATE_RUNNING
    assert job_creates() == 1


async def test_a_bad_spec_is_invalid_argument_naming_the_field(controller: Controller, manifest: Path) -> None:
    stub = await controller.start()
    doc = yaml.safe_load(spec_yaml(manifest))
    doc["stages"][1]["batch_size"] = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=yaml.safe_dump(doc)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.stages[1].batch_size" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetRun(trainer_pb2.GetRunRequest(run_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListRuns(trainer_pb2.ListRunsRequest())
    assert list(listed.runs) == []


# --- RBAC: the Role in deploy/ grants exactly the calls the controller makes -------------------------


def api_call(method: str, path: str, params) -> tuple[str, str, str, bool]:
    """(API group, resource[/subresource], RBAC verb, namespaced) of one Kubernetes API request, as the API
    server's request-info resolver derives them."""
    parts = [p for p in path.split("/") if p]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    namespaced = len(rest) >= 2 and rest[0] == "namespaces"
    if namespaced:
        rest = rest[2:]
    resource, name, sub = [*rest, "", "", ""][:3]
    watching = str(params.get("watch", "")).lower() in ("true", "1")
    verb = {
        "GET": "watch" if watching else ("get" if name else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }[method]
    return group, f"{resource}/{sub}" if sub else resource, verb, namespaced


def role_grants(role: dict) -> set[tuple[str, str, str]]:
    grants = set()
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.update((group, resource, verb) for verb in rule["verbs"])
    return grants


def controller_calls(kmock) -> set[tuple[str, str, str]]:
    calls = set()
    for request in list(kmock):
        headers = {k.lower(): v for k, v in dict(request.headers).items()}
        if headers.get("user-agent") == ACTOR_AGENT:
            continue
        group, resource, verb, namespaced = api_call(str(request.method.value), request.url.path, request.params)
        assert namespaced and f"/namespaces/{NS}/" in request.url.path, f"outside its namespace: {request.url}"
        calls.add((group, resource, verb))
    return calls


async def test_the_role_grants_exactly_the_api_calls_the_controller_makes(
    controller: Controller, kube_settings: Settings, manifest: Path, kmock
) -> None:
    from tests.deploy.manifests import find, kubectl, render

    if kubectl() is None:
        pytest.skip("kubectl is not installed; the Role is read from `kubectl kustomize deploy/overlays/prod`")
    stub = await controller.start()
    # a two-node run (PVC, headless Service, Indexed Job), running: its pods are listed and rank 0's log read
    await stub.SubmitRun(
        trainer_pb2.SubmitRunRequest(spec_yaml=spec_yaml(manifest, resources={"nodes": 2}), run_id="rbac-1")
    )
    core = client.CoreV1Api(batch_api(kube_settings).api_client)
    pod = {"metadata": {"name": "train-rbac-1-0", "namespace": NS, "labels": {"pony.ai/run-id": "rbac-1"}}}
    await asyncio.to_thread(core.create_namespaced_pod, NS, pod, _preload_content=False)
    kmock[f"get /api/v1/namespaces/{NS}/pods/train-rbac-1-0/log"] << b'{"loss": 0.5, "pony_event": "step", "step": 1}\n'
    await patch_status(kube_settings, "train-rbac-1", {"active": 2, "ready": 2})
    running = await wait_state(stub, "rbac-1", trainer_pb2.RUN_STATE_RUNNING)
    deadline = asyncio.get_running_loop().time() + 10
    while running.step != 1 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        running = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id="rbac-1"))).run
    assert running.step == 1
    # a pending run whose Job vanished while the controller was down: the restarted controller's relist misses
    # it, reads it (404) and creates it again
    await stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=spec_yaml(manifest), run_id="rbac-2"))
    await controller.stop()
    await asyncio.to_thread(batch_api(kube_settings).delete_namespaced_job, "train-rbac-2", NS)
    stub = await controller.start()
    deadline = asyncio.get_running_loop().time() + 15
    while await read_job(kube_settings, "train-rbac-2") is None:
        assert asyncio.get_running_loop().time() < deadline, "the missing Job was not created again"
        await asyncio.sleep(0.1)
    # cancel deletes the Job and the Service
    await stub.CancelRun(trainer_pb2.CancelRunRequest(run_id="rbac-1"))
    await controller.stop()

    used = controller_calls(kmock)
    assert {("batch", "jobs", "get"), ("batch", "jobs", "watch"), ("", "pods/log", "get")} <= used  # all paths ran
    objs = render("prod")
    granted = role_grants(find(objs, "Role", "trainer"))
    assert used - granted == set(), "calls the Role does not allow"
    assert granted - used == set(), "grants the controller never uses"
    assert not any("*" in part for grant in granted for part in grant)
    assert not {r for _, r, _ in granted} & {"secrets", "configmaps"}
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
