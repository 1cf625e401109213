"""Triton's scheduling of the sampler's requests, against a dedicated real tritonserver (one model instance, batches
of one, a queue of QUEUE requests per priority level): a full queue is RESOURCE_EXHAUSTED with a retry hint and a
job refused so is requeued, not failed; a priority-9 job queued behind priority-0 jobs starts first; the
non-decoupled sibling `pony_v7_sync` answers a plain KServe-v2 HTTP/JSON `infer` with the gRPC path's image."""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from pony.v1 import sampler_pb2, sampler_pb2_grpc
from pony_common.blobs import BlobStore
from pony_common.catalog import catalog_for
from pony_common.celery_app import is_retryable
from pony_common.config import Settings
from pony_common.grpc.client import channel
from pony_common.testing import ServerLoop
from pony_common.workers import start_worker, stop_worker
from services.sampler.client import SamplerClient, build_request
from services.sampler.model import SamplerModel
from services.sampler.store import JobStore
from services.sampler.tasks import run_job
from tests.conftest import free_port

pytestmark = pytest.mark.triton

TOKEN = "queue-test-token"
SUCCEEDED = sampler_pb2.JOB_STATE_SUCCEEDED
SIZE = 64
QUEUE = 2  # PONY_SAMPLER_MAX_QUEUE of this server: requests Triton queues per priority level
# A generation that holds the single instance for a minute or more; cancelled once the test is done with it.
BUSY = {"width": 256, "height": 256, "steps": 5000}


@pytest.fixture(scope="module")
def stack(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, SamplerModel]]:
    """tritonserver (started by the SamplerModel on free ports) serving pony_v7 and pony_v7_sync with batches of
    one and a queue of QUEUE per level, and a sampler (safety off) in front of it."""
    from services.sampler.app import create_service

    settings = Settings.from_env(
        {},
        state_dir=str(tmp_path_factory.mktemp("queue") / "state"),
        models_dir=str(tiny_models),
        auth_token=TOKEN,
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        sampler_families=("pony_v7",),
        sampler_default_model="pony_v7",
        sampler_default_width=SIZE,
        sampler_default_height=SIZE,
        sampler_default_steps=2,
        sampler_max_batch_size=1,
        sampler_batch_delay_us=0,
        sampler_max_queue=QUEUE,
        sampler_max_steps=BUSY["steps"],
        sampler_safety="off",
        safety_addr="",
        log_json=False,
    )
    model = SamplerModel(settings)
    try:
        with ServerLoop() as servers:
            sampler = servers.start(settings, create_service(settings, model=model))
            yield settings.replace(sampler_addr=f"127.0.0.1:{sampler.port}"), model
    finally:
        model.teardown()


@pytest.fixture(scope="module")
def client(stack: tuple[Settings, SamplerModel]) -> Iterator[SamplerClient]:
    with SamplerClient(stack[0], timeout=300) as c:
        yield c


class Stream:
    """A GenerateStream call at `priority` on its own channel (iterate it for the responses); `close()` cancels the
    call and closes the channel."""

    def __init__(self, settings: Settings, priority: int | None = None, **options: Any) -> None:
        request = sampler_pb2.GenerateStreamRequest(request=build_request("a pony", **options))
        if priority is not None:
            request.priority = priority
        self.channel = channel(settings, settings.sampler_addr)
        self.call = sampler_pb2_grpc.SamplerStub(self.channel).GenerateStream(request, timeout=300)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.call)

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


class Busy:
    """A long generation holding the model's single instance: running once `__enter__` returns (its first step is
    done); cancelled on exit (the model stops at its next step)."""

    def __init__(self, settings: Settings) -> None:
        self.stream = Stream(settings, seed=1, **BUSY)

    def __enter__(self) -> Busy:
        first = next(iter(self.stream))
        assert first.HasField("progress")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


def outcome(settings: Settings, **options: Any) -> tuple[grpc.StatusCode, str]:
    """The status of one GenerateStream call run to its end."""
    stream = Stream(settings, **options)
    try:
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    finally:
        stream.close()
    return grpc.StatusCode.OK, ""


def pending(settings: Settings, model: str = "pony_v7") -> int:
    """Requests waiting in Triton's queue of `model` (its pending-request gauge)."""
    url = f"http://127.0.0.1:{settings.sampler.triton_metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf'nv_inference_pending_request_count{{model="{model}",version="\d+"}} (\d+)', text)
    return int(found.group(1)) if found else 0


def wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_full_queue_is_resource_exhausted_with_a_retry_hint_and_a_job_refused_so_is_requeued(stack) -> None:
    settings, _ = stack
    store = JobStore(catalog_for(settings.database_url))
    job = store.create(build_request_dict(seed=5), 3)
    with ThreadPoolExecutor(16) as pool:
        with Busy(settings):
            # More requests than the queue holds, all at the default level, while the one instance is busy: the
            # ones past the queue are refused at once.
            calls = [pool.submit(outcome, settings, seed=s, steps=1) for s in range(10, 12 + 2 * QUEUE)]
            wait_for(lambda: any(c.done() for c in calls), "a refusal")
            # Fill the job's level (priority 3) the same way, then run the job: Triton refuses it too.
            level = [pool.submit(outcome, settings, seed=s, steps=1, priority=3) for s in range(20, 22 + QUEUE)]
            wait_for(lambda: any(c.done() for c in level), "a refusal at the job's level")
            calls += level
            assert store.claim(job.id)
            with pytest.raises(grpc.RpcError) as err:
                run_job(settings, store, BlobStore(settings.blob_url), job.id)
        outcomes = [c.result() for c in calls]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and is_retryable(err.value)
    assert re.search(r"retry-after: \d+s", err.value.details())
    record = store.get(job.id)
    assert record.state == "queued" and "RESOURCE_EXHAUSTED" in record.error and "retry-after" in record.error
    refused = [details for code, details in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) >= 2 and all("overloaded" in d and re.search(r"retry-after: \d+s", d) for d in refused)
    assert {code for code, _ in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes


def test_a_priority_past_9_is_invalid_argument_naming_it(stack) -> None:
    code, details = outcome(stack[0], seed=1, steps=1, priority=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("priority:"), details


def build_request_dict(**options: Any) -> dict[str, Any]:
    """A job's stored request (what SubmitJob writes), as a dict."""
    from google.protobuf import json_format

    return json_format.MessageToDict(build_request("a pony", **options), preserving_proto_field_name=True)


@pytest.fixture()
def job_worker(stack, client) -> Iterator[subprocess.Popen]:
    """`ponyctl worker --queues generate` with threads, so jobs run (and queue in Triton) at once; ready once a
    first job has run."""
    settings, _ = stack
    proc = start_worker(
        settings,
        ["generate"],
        name="queue-worker",
        pool="threads",
        concurrency=2 * QUEUE + 2,
        log_path=Path(settings.state_dir) / "queue-worker.log",
    )
    try:
        first = client.submit_job("a first pony", seed=1, steps=1)
        wait_for(lambda: client.get_job(first.job_id, omit_images=True).state == SUCCEEDED, "the worker", 180)
        yield proc
    finally:
        stop_worker(proc)


def first_step_event(client: SamplerClient, job_id: str) -> int:
    """The event id of the job's first progress step (event ids are one sequence over all jobs)."""
    for event in client.watch_job(job_id, omit_images=True, timeout=300):
        if event.job.progress_step >= 1:
            return event.event_id
    raise AssertionError(f"job {job_id} made no progress")


def test_a_priority_9_job_queued_behind_priority_0_jobs_starts_first(stack, client, job_worker) -> None:
    settings, _ = stack
    with Busy(settings):
        low = [client.submit_job("a low pony", seed=s, steps=1, priority=0) for s in range(30, 30 + QUEUE)]
        # Both low jobs wait in Triton's queue (the instance is busy) before the high one is submitted.
        wait_for(lambda: pending(settings) >= QUEUE, "the priority-0 jobs to queue in Triton", timeout=120)
        high = client.submit_job("a high pony", seed=40, steps=1, priority=9)
        wait_for(lambda: pending(settings) >= QUEUE + 1, "the priority-9 job to queue in Triton", timeout=120)
    started = {job.job_id: first_step_event(client, job.job_id) for job in (*low, high)}
    for job in (*low, high):
        assert client.get_job(job.job_id, omit_images=True).state == SUCCEEDED
    assert started[high.job_id] < min(started[job.job_id] for job in low), started


def kserve_infer(settings: Settings, model: str, values: dict[str, tuple[str, Any]]) -> tuple[int, Any]:
    """A plain KServe-v2 HTTP/JSON `infer` (urllib, no tritonclient): (status, JSON body or error text)."""
    body = {
        "inputs": [
            {"name": name, "shape": [1, 1], "datatype": dtype, "data": [value]}
            for name, (dtype, value) in values.items()
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{settings.sampler.triton_http_port}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def inputs_of(resp: sampler_pb2.GenerateResponse, seed: int) -> dict[str, tuple[str, Any]]:
    """The model inputs of a sampler response (its assembled prompt and settings) at `seed`."""
    return {
        "PROMPT": ("BYTES", resp.prompt),
        "NEGATIVE_PROMPT": ("BYTES", resp.negative_prompt),
        "WIDTH": ("INT32", resp.width),
        "HEIGHT": ("INT32", resp.height),
        "STEPS": ("INT32", resp.steps),
        "GUIDANCE": ("FP32", resp.guidance),
        "SEED": ("INT64", seed),
        "NUM_IMAGES": ("INT32", 1),
        "PREVIEW": ("BOOL", False),
    }


def test_a_plain_kserve_http_infer_on_the_sync_sibling_equals_the_grpc_image(stack, client) -> None:
    settings, _ = stack
    resp = client.generate("a pony in a meadow", seed=11, steps=2, score=9)
    values = inputs_of(resp, 11)
    status, body = kserve_infer(settings, "pony_v7_sync", values)
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert "PREVIEW" not in outputs and outputs["SEEDS"]["data"] == [11]
    images = outputs["IMAGES"]
    got = np.array(images["data"], dtype=np.uint8).reshape(images["shape"])[0, 0]
    want = np.asarray(Image.open(io.BytesIO(resp.images[0].png)).convert("RGB"))
    assert got.shape == want.shape and np.array_equal(got, want)
    # The decoupled model itself still refuses plain HTTP infer; its sibling is the way in.
    status, text = kserve_infer(settings, "pony_v7", values)
    assert status == 501 and "decoupled" in text


def test_the_sync_sibling_answers_the_models_errors_with_their_codes(stack, client) -> None:
    settings, _ = stack
    values = inputs_of(client.generate("a pony", seed=3, steps=1), 3)
    values["WIDTH"] = ("INT32", 17)
    status, text = kserve_infer(settings, "pony_v7_sync", values)
    assert status == 400 and "width" in text


def test_overload_through_the_sync_sibling_is_503(stack, client) -> None:
    settings, _ = stack
    values = inputs_of(client.generate("a pony", seed=4, steps=1), 4)
    with ThreadPoolExecutor(8) as pool:
        with Busy(settings):
            calls = [pool.submit(kserve_infer, settings, "pony_v7_sync", values) for _ in range(8)]
            wait_for(lambda: any(c.done() for c in calls), "a refusal")
        statuses = [c.result()[0] for c in calls]
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses


def test_the_rendered_configs_carry_the_priorities_the_queue_bound_and_the_instance_count(tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from services.sampler.repository import ModelRepository, triton_priority

    assert [triton_priority(p) for p in (9, 5, 0)] == [1, 5, 10]
    settings = Settings.from_env(
        {},
        state_dir=str(tmp_path / "state"),
        sampler_instances=3,
        sampler_max_queue=7,
        sampler_default_priority=2,
    )
    ModelRepository(tmp_path / "repo").render(settings)
    family = text_format.Parse((tmp_path / "repo" / "pony_v7" / "config.pbtxt").read_text(), mc.ModelConfig())
    sibling = text_format.Parse((tmp_path / "repo" / "pony_v7_sync" / "config.pbtxt").read_text(), mc.ModelConfig())
    batching = family.dynamic_batching
    assert (batching.priority_levels, batching.default_priority_level) == (10, 8)
    assert batching.default_queue_policy.max_queue_size == 7
    assert family.instance_group[0].count == 3 and family.model_transaction_policy.decoupled
    assert sibling.name == "pony_v7_sync" and not sibling.model_transaction_policy.decoupled
    assert sibling.parameters["target_model"].string_value == "pony_v7"
    assert sibling.dynamic_batching == batching and sibling.max_batch_size == family.max_batch_size
    assert [i.name for i in sibling.input] == [i.name for i in family.input]
    assert [o.name for o in sibling.output] == [o.name for o in family.output if o.name != "PREVIEW"]
    assert sibling.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and sibling.instance_group[0].count == 6
    assert (tmp_path / "repo" / "pony_v7_sync" / "1" / "model.py").is_file()
