"""The sampler against a real tritonserver serving the tiny AuraFlow as `pony_v7` (the default family; `pony_v6`
is served beside it, tests/sampler/test_families.py): bit-identity with a direct diffusers call,
dynamic batching, streaming order, cancellation and deadlines reaching the model, validation, auth, safety."""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from pony.v1 import common_pb2, sampler_pb2, sampler_pb2_grpc
from pony_common.access import runs_root
from pony_common.models.auraflow import load_pipeline
from services.sampler.client import SamplerClient, build_request
from services.sampler.pnginfo import read_parameters
from tests.sampler_stack import SIZE, STEPS, SamplerStack, direct, pixels

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def pipe(tiny_models: Path):
    return load_pipeline(str(tiny_models / "auraflow"))


@pytest.fixture(scope="module")
def client(sampler_stack: SamplerStack):
    with SamplerClient(sampler_stack.settings, timeout=120) as c:
        yield c


def triton_log(stack: SamplerStack) -> str:
    return (Path(stack.settings.state_dir) / "logs" / "tritonserver.log").read_text(errors="replace")


def wait_for_log(stack: SamplerStack, pattern: str, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, triton_log(stack))
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the Triton log")


def test_generate_through_triton_equals_the_direct_pipeline_pixel_for_pixel(
    client, pipe, record_property, sampler_stack: SamplerStack
) -> None:
    resp = client.generate("a pony in a meadow", seed=7, steps=STEPS, guidance=3.5, score=9, source="pony")
    assert resp.prompt == "score_9, source_pony, a pony in a meadow"
    # The version serving now (earlier tests of the session may have swapped in copies of the same weights).
    serving = sampler_stack.model.repositories["pony_v7"].latest()
    assert resp.provenance.model == "pony_v7" and resp.provenance.model_version == str(serving)
    assert resp.safety == sampler_pb2.SAFETY_STATUS_CHECKED and not resp.blocked
    (image,) = resp.images
    assert (image.width, image.height, image.seed) == (SIZE, SIZE, 7)
    got = pixels(image.png)
    want = direct(pipe, resp, 7)
    record_property("max_pixel_diff_unbatched", int(np.abs(got.astype(int) - want.astype(int)).max()))
    assert got.shape == (SIZE, SIZE, 3)
    assert np.array_equal(got, want)
    params = read_parameters(image.png)
    assert params["prompt"] == resp.prompt and params["seed"] == 7 and params["model_version"] == str(serving)
    assert (
        params["parameters"]
        .splitlines()[-1]
        .startswith("Steps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 3.5")
    )


def test_concurrent_requests_are_batched_and_stay_within_one_level_of_the_unbatched_image(
    sampler_stack: SamplerStack, client, pipe, record_property
) -> None:
    seeds = [100, 200, 300, 400]

    def one(seed: int) -> sampler_pb2.GenerateResponse:
        return client.generate("a dragon on a hill", seed=seed, num_images=2 if seed == 400 else 1)

    with ThreadPoolExecutor(len(seeds)) as pool:
        responses = list(pool.map(one, seeds))
    assert max(r.batch_size for r in responses) > 1, [r.batch_size for r in responses]
    worst = 0
    for resp in responses:
        for image in resp.images:
            diff = np.abs(pixels(image.png).astype(int) - direct(pipe, resp, image.seed).astype(int)).max()
            worst = max(worst, int(diff))
    assert [img.seed for img in responses[-1].images] == [400, 401]
    record_property("batch_sizes", [r.batch_size for r in responses])
    record_property("max_pixel_diff_batched", worst)
    assert worst <= 1


def test_stream_sends_every_step_in_order_then_the_result(client) -> None:
    events = list(client.stream("a fox in the snow", seed=3, steps=5, preview=True))
    *progress, last = events
    assert [e.progress.step for e in progress] == [1, 2, 3, 4, 5]
    assert {e.progress.total for e in progress} == {5}
    assert all(e.WhichOneof("event") == "progress" for e in progress)
    assert Image.open(io.BytesIO(progress[0].progress.preview_png)).size == (SIZE // 8, SIZE // 8)
    assert last.WhichOneof("event") == "result"
    assert len(last.result.images) == 1 and last.result.seed == 3


def test_cancelling_a_stream_stops_the_model_between_steps(sampler_stack: SamplerStack) -> None:
    with sampler_stack.channel() as ch:
        stub = sampler_pb2_grpc.SamplerStub(ch)
        slow = build_request("a slow owl", seed=1, steps=100, width=256, height=256)
        request = sampler_pb2.GenerateStreamRequest(request=slow)
        call = stub.GenerateStream(request, timeout=120, metadata=[("x-request-id", "cancel-me-1")])
        first = next(call)
        assert first.progress.step >= 1
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    found = wait_for_log(sampler_stack, r"pony_v7 request cancel-me-1 cancelled after step (\d+) of 100")
    assert int(found.group(1)) < 100


def test_a_deadline_reaches_triton(sampler_stack: SamplerStack) -> None:
    with sampler_stack.channel() as ch:
        stub = sampler_pb2_grpc.SamplerStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            slow = build_request("a late owl", seed=1, steps=100, width=512, height=512)
            stub.Generate(slow, timeout=1.5, metadata=[("x-request-id", "deadline-1")])
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    found = wait_for_log(sampler_stack, r"pony_v7 request deadline-1 cancelled after step (\d+) of 100")
    assert int(found.group(1)) < 100


INVALID = [
    ("width", dict(width=100)),
    ("width", dict(width=2048)),
    ("height", dict(height=8)),
    ("height", dict(height=1552)),
    ("steps", dict(steps=101)),
    ("guidance", dict(guidance=-1.0)),
    ("guidance", dict(guidance=21.0)),
    ("guidance", dict(guidance=float("nan"))),
    ("num_images", dict(num_images=5)),
    ("seed", dict(seed=-3)),
    ("prompt", dict(prompt="pony " * 300)),
    ("prompt", dict(prompt="   ")),
    ("negative_prompt", dict(negative_prompt="blurry " * 300)),
    ("tags.score", dict(score=10)),
    ("tags.source", dict(source="photo")),
]


@pytest.mark.parametrize(("field", "options"), INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_each_invalid_field_is_invalid_argument_naming_it(client, field: str, options: dict) -> None:
    prompt = options.pop("prompt", "a pony")
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompt, **options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_the_token_limit_comes_from_the_tokenizer_and_counts_the_tags(client) -> None:
    # 255 words + </s> = 256 tokens: at the limit; the score tags push it over.
    client.generate("pony " * 255, raw_prompt=True, steps=1, seed=1)
    with pytest.raises(grpc.RpcError) as err:
        client.generate("pony " * 255, score=7, steps=1, seed=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = re.fullmatch(r"prompt: is (\d+) tokens with its tags long; the limit is 256", err.value.details())
    assert found and int(found.group(1)) > 256


def test_a_missing_or_wrong_bearer_token_is_unauthenticated(sampler_stack: SamplerStack) -> None:
    for token in (None, "wrong"):
        with sampler_stack.channel(token=token) as ch:
            with pytest.raises(grpc.RpcError) as err:
                sampler_pb2_grpc.SamplerStub(ch).Generate(build_request("a pony", seed=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_blocked_image_is_not_returned_only_why(client) -> None:
    resp = client.generate("deepfake, a pony", seed=5, num_images=2, steps=1)
    assert not resp.images
    assert [b.seed for b in resp.blocked] == [5, 6]
    assert all(b.reasons and b.reasons[0].rule_id for b in resp.blocked)
    assert resp.safety == sampler_pb2.SAFETY_STATUS_CHECKED


def test_safety_configured_but_down_fails_closed_and_off_says_so(sampler_stack: SamplerStack, tiny_models) -> None:
    from tests.conftest import free_port

    base = sampler_stack.settings.replace(triton_start=False, triton_url=sampler_stack.model.url)
    down = sampler_stack.start_sampler(base.replace(safety_addr=f"127.0.0.1:{free_port()}", rpc_retries=2))
    off = sampler_stack.start_sampler(base.replace(sampler_safety="off"))
    try:
        with SamplerClient(base, target=f"127.0.0.1:{down.port}", timeout=60) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate("a pony", seed=1, steps=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "safety service" in err.value.details()
        with SamplerClient(base, target=f"127.0.0.1:{off.port}", timeout=60) as c:
            resp = c.generate("a pony", seed=1, steps=1)
            assert resp.safety == sampler_pb2.SAFETY_STATUS_NOT_CHECKED
            assert "not checked" in resp.safety_note and len(resp.images) == 1
            assert resp.images[0].rating == common_pb2.RATING_UNSPECIFIED
    finally:
        sampler_stack.stop_server(down)
        sampler_stack.stop_server(off)


def test_triton_down_is_unavailable_and_the_sampler_recovers_when_it_returns(sampler_stack: SamplerStack) -> None:
    model = sampler_stack.model
    assert model.process is not None
    model.process.kill()
    # A channel without retries sees the outage as it is.
    with grpc.insecure_channel(sampler_stack.addr) as ch:
        stub = sampler_pb2_grpc.SamplerStub(ch)
        meta = [("authorization", f"Bearer {sampler_stack.settings.auth_token}")]
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(build_request("a pony", seed=1, steps=1), timeout=30, metadata=meta)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The watchdog restarts tritonserver and reloads the model; calls succeed again.
        deadline = time.monotonic() + 180
        while True:
            try:
                resp = stub.Generate(build_request("a pony", seed=1, steps=1), timeout=30, metadata=meta)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, "the sampler did not recover"
                time.sleep(0.5)
    assert len(resp.images) == 1


def test_versions_swap_under_load_without_failing_a_request(sampler_stack: SamplerStack, client) -> None:
    from diffusers import AuraFlowPipeline
    from sqlalchemy import select

    from pony_common.catalog import catalog_for
    from pony_common.catalog.models import ModelVersionRow
    from pony_common.models.auraflow import build_auraflow_components
    from services.stack.tiny import auraflow_tokenizer

    checkpoint = Path(runs_root(sampler_stack.settings)) / "swap" / "final"  # LoadVersion reads the model roots
    AuraFlowPipeline(**build_auraflow_components(auraflow_tokenizer(), seed=11)).save_pretrained(checkpoint)
    before = {v.version for v in client.list_versions(model="pony_v7")}
    stop = threading.Event()
    results: list[tuple[str, object]] = []

    def load() -> None:
        while not stop.is_set():
            try:
                resp = client.generate("a pony", seed=9, steps=2)
                results.append(("ok", resp.provenance.model_version))
            except grpc.RpcError as exc:
                results.append(("error", f"{exc.code().name}: {exc.details()}"))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        loaded = client.load_version(str(checkpoint), source_run_id="run-42", timeout=300)
        new = loaded.version
        while not any(v == str(new) for kind, v in results if kind == "ok"):
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert new == max(before) + 1 and loaded.active and loaded.state == sampler_pb2.VERSION_STATE_READY
    assert sampler_model_info()["version"] == str(new)  # the model-info metric follows the version that serves
    errors = [r for r in results if r[0] == "error"]
    assert not errors, errors
    served = [v for _, v in results]
    assert str(new - 1) in served and str(new) in served
    # Once the new version answers, the old one answers no more.
    assert str(new - 1) not in served[served.index(str(new)) + 3 :]
    # The old version finishes its requests and is unloaded (its memory freed), not left half-unloaded.
    deadline = time.monotonic() + 60
    while True:
        versions = {v.version: v for v in client.list_versions(model="pony_v7")}
        if versions[new - 1].state == sampler_pb2.VERSION_STATE_UNLOADED or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert versions[new].state == sampler_pb2.VERSION_STATE_READY and versions[new].active
    assert versions[new - 1].state == sampler_pb2.VERSION_STATE_UNLOADED and not versions[new - 1].active
    with catalog_for(sampler_stack.settings.database_url).session() as s:
        rows = {r.version: r for r in s.scalars(select(ModelVersionRow).where(ModelVersionRow.name == "pony_v7"))}
    assert rows[new].source_run_id == "run-42" and rows[new].active and rows[new].uri == str(checkpoint)
    assert not rows[new - 1].active


def sampler_model_info() -> dict[str, str]:
    """The labels of the sampler's pony_model_info sample in this process's registry."""
    from prometheus_client import REGISTRY

    (labels,) = [s.labels for f in REGISTRY.collect() for s in f.samples if s.name == "pony_model_info"
                 and s.labels.get("service") == "sampler"]  # fmt: skip
    return labels


def test_the_model_info_metric_names_the_version_that_serves(client) -> None:
    (active,) = [v for v in client.list_versions(model="pony_v7") if v.active]
    info = sampler_model_info()
    assert info["model"] == "pony_v7" and info["version"] == str(active.version) and info["uri"], info


def test_load_version_rejects_what_is_not_a_pipeline(sampler_stack: SamplerStack, client) -> None:
    not_a_pipeline = Path(runs_root(sampler_stack.settings)) / "not-a-pipeline"
    not_a_pipeline.mkdir(parents=True, exist_ok=True)
    for uri in ("", str(not_a_pipeline)):
        with pytest.raises(grpc.RpcError) as err:
            client.load_version(uri)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("uri:")


def test_a_checkpoint_that_fails_to_load_is_refused_and_the_served_version_stays(
    sampler_stack: SamplerStack, client, tiny_models
) -> None:
    import shutil

    broken = Path(runs_root(sampler_stack.settings)) / "broken"
    shutil.copytree(tiny_models / "auraflow", broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    before = [(v.version, v.active) for v in client.list_versions(model="pony_v7")]
    with pytest.raises(grpc.RpcError) as err:
        client.load_version(str(broken), timeout=300)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "failed to load" in err.value.details()
    assert [(v.version, v.active) for v in client.list_versions(model="pony_v7")] == before
    served = max(v for v, active in before if active)
    assert client.generate("a pony", seed=1, steps=1).provenance.model_version == str(served)


def test_one_bad_request_in_a_triton_batch_gets_its_own_error_and_the_others_their_images(sampler_stack) -> None:
    """Straight to Triton (the sampler would reject it first): the model answers per request, never per batch."""
    import asyncio

    import tritonclient.grpc.aio as taio

    from services.sampler.generation import GenerationSpec

    model = sampler_stack.model

    def spec(width: int, seed: int) -> GenerationSpec:
        return GenerationSpec("a pony", "a pony", "", width, SIZE, 2, 3.5, seed, 1)

    async def one(client, request_spec: GenerationSpec) -> tuple[str, object]:
        async def requests():
            yield {"model_name": "pony_v7", "inputs": model._inputs(request_spec)}

        async for result, error in client.stream_infer(requests()):
            if error is not None:
                return "error", error.message()
            if result.as_numpy("IMAGES") is not None:
                return "images", int(result.as_numpy("BATCH")[0, 0])
        return "none", None

    async def run() -> list[tuple[str, object]]:
        client = taio.InferenceServerClient(model.url)
        try:
            calls = [one(client, spec(width, seed)) for width, seed in ((SIZE, 1), (100, 2), (SIZE, 3))]
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    good1, bad, good2 = asyncio.run(run())
    assert bad == ("error", "invalid_argument: width: must be a positive multiple of 16 up to 1536, got 100")
    assert good1[0] == "images" and good2[0] == "images"
