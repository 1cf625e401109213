"""LoRAs per request through gRPC + a real tritonserver (the session's sampler stack: tiny pony_v7 and pony_v6):
a LoRA request equals the diffusers pipeline with the same adapter loaded (same seed), two requests with different
adapters in flight at once each equal their own direct run, a zero-weight adapter equals no adapter, an adapter
changes the image; adapters are registered and removed by the admin role only; the PNG carries `Lora hashes` and
`Model hash` that sd-parsers reads; jobs carry adapters too."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from sd_parsers import ParserManager

from pony.v1 import sampler_pb2, sampler_pb2_grpc
from services.sampler.adapters import read_lora_file
from services.sampler.client import SamplerClient
from services.sampler.lora import LORA_FILE
from services.sampler.pnginfo import read_parameters, weights_sha256
from tests.sampler.test_adapters import make_lora
from tests.sampler_stack import SamplerStack

pytestmark = pytest.mark.triton
GENERATE_TOKEN = "lora-test-generate-token"


@pytest.fixture(scope="module")
def client(sampler_stack: SamplerStack):
    with SamplerClient(sampler_stack.settings, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def loras(tiny_models: Path, client: SamplerClient) -> dict[str, Path]:
    """Three LoRAs under the model roots, registered as lt-a, lt-b (V7) and lt-v6 (V6)."""
    base = tiny_models / "loras_triton"
    made = {
        "lt-a": make_lora(tiny_models, base / "a", "pony_v7", seed=11, scale=30.0),
        "lt-b": make_lora(tiny_models, base / "b", "pony_v7", seed=12, scale=30.0),
        "lt-v6": make_lora(tiny_models, base / "v6", "pony_v6", seed=13),
    }
    for name, folder in made.items():
        family = "pony_v6" if name == "lt-v6" else ""
        adapter = client.register_adapter(name, str(folder), family=family)
        assert adapter.version >= 1 and adapter.sha256 == read_lora_file(str(folder / LORA_FILE)).sha256
    return made


@pytest.fixture(scope="module")
def auraflow(tiny_models: Path):
    from pony_common.models.auraflow import load_pipeline

    return load_pipeline(str(tiny_models / "auraflow"))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def direct(pipe, resp: sampler_pb2.GenerateResponse, loras: dict[str, Path], weights: dict[str, float]) -> np.ndarray:
    """The pipeline called directly with the same prompt, seed and settings, and these adapters loaded."""
    names = [name for name, w in weights.items() if w != 0]
    loaded = {n for ns in pipe.get_list_adapters().values() for n in ns}
    for name in names:
        if name not in loaded:
            pipe.load_lora_weights(str(loras[name]), adapter_name=name)
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[weights[n] for n in names])
    elif loaded:
        pipe.disable_lora()
    image = pipe(
        resp.prompt,
        negative_prompt=resp.negative_prompt,
        width=resp.width,
        height=resp.height,
        num_inference_steps=resp.steps,
        guidance_scale=resp.guidance,
        generator=torch.Generator().manual_seed(resp.images[0].seed),
    ).images[0]
    return np.asarray(image)


def test_a_lora_request_equals_diffusers_with_the_adapter_loaded(client, loras, auraflow, tiny_models) -> None:
    resp = client.generate("a pony in a meadow", seed=21, adapters=["lt-a"])
    assert [(a.name, a.weight) for a in resp.adapters] == [("lt-a", 1.0)] and resp.adapters[0].version >= 1
    got = pixels(resp.images[0].png)
    assert np.array_equal(got, direct(auraflow, resp, loras, {"lt-a": 1.0}))
    plain = client.generate("a pony in a meadow", seed=21)
    assert not plain.adapters
    changed = np.abs(got.astype(int) - pixels(plain.images[0].png).astype(int))
    assert changed.max() > 1 and (changed > 0).mean() > 0.05  # the adapter acts (tiny model: a few levels)
    assert np.array_equal(pixels(plain.images[0].png), direct(auraflow, plain, loras, {}))

    # The PNG: A1111's Model hash and Lora hashes, as sd-parsers reads them.
    model_hash = weights_sha256(tiny_models / "auraflow")[:10]
    assert resp.model_hash == model_hash
    lora_hash = read_lora_file(str(loras["lt-a"] / LORA_FILE)).tensor_sha256[:12]
    info = ParserManager().parse(Image.open(io.BytesIO(resp.images[0].png)))
    (sampler,) = info.samplers
    assert sampler.model.hash == model_hash and sampler.parameters["seed"] == "21"
    assert [p.value for p in sampler.prompts] == [resp.prompt]
    assert info.metadata["Hashes"]["lora:lt-a"] == lora_hash
    params = read_parameters(resp.images[0].png)
    assert f'Lora hashes: "lt-a: {lora_hash}"' in params["parameters"]
    assert params["adapters"][0]["name"] == "lt-a" and params["model_hash"] == model_hash


def test_a_zero_weight_adapter_equals_no_adapter(client, loras) -> None:
    plain = client.generate("a pony at night", seed=22)
    zero = client.generate("a pony at night", seed=22, adapters=["lt-a=0"])
    assert [(a.name, a.weight) for a in zero.adapters] == [("lt-a", 0.0)]
    assert np.array_equal(pixels(zero.images[0].png), pixels(plain.images[0].png))


def test_two_requests_with_different_adapters_in_flight_at_once_both_come_back_right(
    sampler_stack: SamplerStack, loras, auraflow
) -> None:
    asks = [("lt-a=1",), ("lt-b=0.5",), ("lt-a=1", "lt-b=0.5"), ()]

    def one(adapters: tuple[str, ...]) -> sampler_pb2.GenerateResponse:
        with SamplerClient(sampler_stack.settings, timeout=120) as c:
            return c.generate("two ponies", seed=23, adapters=list(adapters))

    with ThreadPoolExecutor(len(asks)) as pool:  # all in Triton's batch window (50 ms) together
        responses = list(pool.map(one, asks))
    images = [pixels(r.images[0].png) for r in responses]
    for resp, image in zip(responses, images, strict=True):
        weights = {a.name: a.weight for a in resp.adapters}
        assert resp.batch_size == 1  # different adapter sets never share a pipeline batch
        assert np.array_equal(image, direct(auraflow, resp, loras, weights)), weights
    assert len({im.tobytes() for im in images}) == len(images)  # four different images


def test_same_adapter_set_requests_batch_together(sampler_stack: SamplerStack, loras) -> None:
    def one(seed: int) -> sampler_pb2.GenerateResponse:
        with SamplerClient(sampler_stack.settings, timeout=120) as c:
            return c.generate("a pony", seed=seed, adapters=["lt-b=0.5"])

    with ThreadPoolExecutor(3) as pool:
        sizes = [r.batch_size for r in pool.map(one, (31, 32, 33))]
    assert max(sizes) > 1  # the same set (and size, steps, guidance) runs as one batch


def test_a_v6_lora_request_equals_the_sdxl_pipeline_with_the_adapter_loaded(client, loras, tiny_models) -> None:
    from pony_common.models.sdxl import load_pipeline

    resp = client.generate("a pony", model="pony_v6", seed=24, guidance=7.0, adapters=["lt-v6=0.5"])
    sdxl = load_pipeline(str(tiny_models / "sdxl"))
    assert np.array_equal(pixels(resp.images[0].png), direct(sdxl, resp, loras, {"lt-v6": 0.5}))
    with pytest.raises(grpc.RpcError) as err:  # a V7 adapter on the V6 family
        client.generate("a pony", model="pony_v6", seed=24, adapters=["lt-a"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("adapters[0]:")


@pytest.mark.parametrize(
    ("adapters", "field"),
    [
        (["nope"], "adapters[0].name"),
        (["lt-a:99"], "adapters[0].version"),
        (["lt-a=5"], "adapters[0].weight"),
        (["lt-a", "lt-a=0.5"], "adapters[1]"),
        (["lt-a"] * 5, "adapters"),
    ],
)
def test_bad_adapters_are_invalid_argument_naming_the_field(client, loras, adapters, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate("a pony", seed=1, adapters=adapters)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_adapters_are_registered_and_removed_by_the_admin_role_only(
    sampler_stack: SamplerStack, client, loras, tiny_models
) -> None:
    settings = sampler_stack.settings.replace(
        triton_start=False, triton_url=sampler_stack.model.url, auth_tokens=f"generate:{GENERATE_TOKEN}"
    )
    running = sampler_stack.start_sampler(settings)  # its own model over the stack's Triton
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = sampler_pb2_grpc.SamplerStub(ch)
            meta = [("authorization", f"Bearer {GENERATE_TOKEN}")]
            for call, req in (
                (stub.RegisterAdapter, sampler_pb2.RegisterAdapterRequest(name="x", uri=str(loras["lt-a"]))),
                (stub.RemoveAdapter, sampler_pb2.RemoveAdapterRequest(name="lt-a")),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(req, metadata=meta, timeout=30)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            listed = stub.ListModels(sampler_pb2.ListModelsRequest(), metadata=meta, timeout=30).models
            by_family = {m.name: {a.name for a in m.adapters} for m in listed}
            assert {"lt-a", "lt-b"} <= by_family["pony_v7"] and "lt-v6" in by_family["pony_v6"]
            assert "lt-v6" not in by_family["pony_v7"]
    finally:
        sampler_stack.stop_server(running)

    # The admin registers a new version, and removes it: requests naming it are then INVALID_ARGUMENT.
    added = client.register_adapter("lt-a", str(make_lora(tiny_models, tiny_models / "loras_triton" / "a2", seed=14)))
    resp = client.generate("a pony", seed=25, adapters=["lt-a"])  # version 0: the newest
    assert resp.adapters[0].version == added.version
    removed = client.remove_adapter("lt-a", added.version)
    assert [a.version for a in removed] == [added.version]
    with pytest.raises(grpc.RpcError) as err:
        client.generate("a pony", seed=25, adapters=[f"lt-a:{added.version}"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.generate("a pony", seed=25, adapters=["lt-a"]).adapters[0].version < added.version
    with pytest.raises(grpc.RpcError) as err:
        client.register_adapter("lt-c", "/etc")  # outside the model roots
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("uri:")


def test_a_job_carries_its_adapters_with_their_versions_fixed(sampler_stack: SamplerStack, client, loras) -> None:
    from tests.sampler.test_jobs import wait_state, worker

    job = client.submit_job("a pony", seed=26, adapters=["lt-b=0.5"])
    assert [(a.name, a.weight) for a in job.request.adapters] == [("lt-b", 0.5)]
    assert job.request.adapters[0].version >= 1  # resolved when submitted, as the seed is
    with worker(sampler_stack.settings, "lora-generate-worker"):
        done = wait_state(client, job.job_id, {sampler_pb2.JOB_STATE_SUCCEEDED, sampler_pb2.JOB_STATE_FAILED})
    assert done.state == sampler_pb2.JOB_STATE_SUCCEEDED, done.error
    assert [(a.name, a.weight) for a in done.result.adapters] == [("lt-b", 0.5)]
    png = client.get_job(job.job_id).result.images[0].png
    same = client.generate("a pony", seed=26, adapters=["lt-b=0.5"])
    assert np.array_equal(pixels(png), pixels(same.images[0].png))


def test_ponyctl_generate_lora(sampler_stack: SamplerStack, loras, monkeypatch, tmp_path, capsys) -> None:
    from pony_common.cli.main import main

    monkeypatch.setenv("PONY_SAMPLER_ADDR", sampler_stack.addr)
    monkeypatch.setenv("PONY_AUTH_TOKEN", sampler_stack.settings.auth_token)
    monkeypatch.setenv("PONY_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "pony.png"
    assert main(["generate", "a pony", "--seed", "3", "--out", str(out), "--lora", "lt-a=0.5", "--lora", "lt-b"]) == 0
    adapters = read_parameters(out.read_bytes())["adapters"]
    assert [(a["name"], a["weight"]) for a in adapters] == [("lt-a", 0.5), ("lt-b", 1.0)]
    capsys.readouterr()
    for bad, reason in (
        (["--lora", "lt-a:x"], "--lora: a LoRA is name[:version][=weight]"),
        (["--lora", "nope"], "adapters[0].name"),
    ):
        assert main(["generate", "a pony", "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err, err


def test_a_lora_file_changed_after_registration_is_failed_precondition(client, tiny_models) -> None:
    folder = make_lora(tiny_models, tiny_models / "loras_triton" / "changed", seed=15)
    client.register_adapter("lt-changed", str(folder))
    make_lora(tiny_models, folder, seed=16)  # other bytes under the registered name
    with pytest.raises(grpc.RpcError) as err:
        client.generate("a pony", seed=27, adapters=["lt-changed"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "sha256" in err.value.details()
    assert client.generate("a pony", seed=27).images  # the model serves on
