"""Model families side by side: `pony_v6` (the tiny StableDiffusionXLPipeline) beside `pony_v7` in one real
tritonserver, each Triton model from the one generic model.py. A V6 image through gRPC + Triton equals the SDXL
pipeline called directly; a request names its family (unknown -> INVALID_ARGUMENT `model`), V6 prompts follow the
V6 convention and its 77-token budget, ListModels lists both, and V6 versions load on their own."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from pony.v1 import sampler_pb2
from pony_common.access import runs_root
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.models.sdxl import load_pipeline
from services.sampler.client import SamplerClient
from services.sampler.families import served
from services.sampler.generation import GenerationInput
from services.sampler.pnginfo import read_parameters
from services.sampler.prompts import PromptTags
from services.sampler.repository import ModelRepository
from services.sampler.validation import RequestValidator
from tests.sampler_stack import SIZE, STEPS, SamplerStack, direct, pixels

V6_UP = "score_7_up, score_6_up, score_5_up, score_4_up"


@pytest.fixture(scope="module")
def sdxl(tiny_models: Path):
    return load_pipeline(str(tiny_models / "sdxl"))


@pytest.fixture(scope="module")
def client(sampler_stack: SamplerStack):
    with SamplerClient(sampler_stack.settings, timeout=120) as c:
        yield c


# --- through Triton (the session's sampler stack serves pony_v7, the default, and pony_v6) ---


@pytest.mark.triton
def test_a_v6_image_through_triton_equals_the_sdxl_pipeline_called_directly(
    client, sdxl, record_property, sampler_stack: SamplerStack
) -> None:
    resp = client.generate("a pony in a meadow", model="pony_v6", seed=7, guidance=7.0, score=7, source="pony")
    assert resp.prompt == f"{V6_UP}, source_pony, a pony in a meadow"  # the V6 convention
    serving = sampler_stack.model.repositories["pony_v6"].latest()  # the session's tests may have swapped versions
    assert resp.model == "pony_v6" and resp.provenance.model == "pony_v6"
    assert resp.provenance.model_version == str(serving)
    assert (resp.width, resp.height, resp.steps) == (SIZE, SIZE, STEPS)
    (image,) = resp.images
    got, want = pixels(image.png), direct(sdxl, resp, 7)
    record_property("max_pixel_diff_v6", int(np.abs(got.astype(int) - want.astype(int)).max()))
    assert got.shape == (SIZE, SIZE, 3)
    assert np.array_equal(got, want)
    params = read_parameters(image.png)
    assert params["model"] == "pony_v6" and params["sampler"] == "Euler" and params["seed"] == 7
    assert "Model: pony_v6" in params["parameters"]


@pytest.mark.triton
def test_v6_batched_requests_stay_within_one_level_of_their_own_images(client, sdxl) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> sampler_pb2.GenerateResponse:
        return client.generate("a dragon on a hill", model="pony_v6", seed=seed, num_images=2 if seed == 30 else 1)

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(one, [10, 20, 30]))
    worst = max(
        int(np.abs(pixels(img.png).astype(int) - direct(sdxl, r, img.seed).astype(int)).max())
        for r in responses
        for img in r.images
    )
    assert [img.seed for img in responses[-1].images] == [30, 31]
    assert worst <= 1


@pytest.mark.triton
def test_the_families_keep_their_own_conventions_defaults_and_token_budgets(client) -> None:
    v7 = client.generate("a fox", seed=1, steps=1, score=7)
    assert v7.model == "pony_v7" and v7.prompt == "score_9, score_8, score_7, a fox"
    v6 = client.generate("a fox", model="pony_v6", seed=1, steps=1, score=9)
    assert v6.prompt == "score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up, a fox"
    assert v6.guidance == pytest.approx(7.0) and v7.guidance == pytest.approx(3.5)
    # CLIP: 75 words + start + end = 77 tokens fit; 76 do not.
    client.generate("pony " * 75, model="pony_v6", raw_prompt=True, steps=1, seed=1)
    with pytest.raises(grpc.RpcError) as err:
        client.generate("pony " * 76, model="pony_v6", raw_prompt=True, steps=1, seed=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("prompt: is 78 tokens") and err.value.details().endswith("the limit is 77")


@pytest.mark.triton
@pytest.mark.parametrize("model", ["pony_v5", "sdxl", "PONY_V6 "])
def test_an_unknown_model_is_invalid_argument_naming_model(client, model: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate("a pony", model=model, seed=1, steps=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("model:"), err.value.details()
    assert "pony_v7, pony_v6" in err.value.details()


@pytest.mark.triton
def test_list_models_shows_both_families_with_defaults_limits_and_versions(client) -> None:
    models = {m.name: m for m in client.list_models()}
    assert list(models) == ["pony_v7", "pony_v6"]
    v7, v6 = models["pony_v7"], models["pony_v6"]
    assert v7.is_default and not v6.is_default
    assert (v7.pipeline, v7.prompt_convention) == ("AuraFlowPipeline", "v7")
    assert (v6.pipeline, v6.prompt_convention) == ("StableDiffusionXLPipeline", "v6")
    assert (v7.defaults.max_prompt_tokens, v6.defaults.max_prompt_tokens) == (256, 77)
    assert (v6.defaults.width, v6.defaults.height, v6.defaults.steps) == (SIZE, SIZE, STEPS)
    assert v6.defaults.guidance == pytest.approx(7.0) and v7.defaults.guidance == pytest.approx(3.5)
    assert v6.defaults.max_width == 1536 and v6.defaults.max_images == 4
    for family in (v7, v6):
        assert family.versions and all(v.model == family.name for v in family.versions)
        (active,) = [v for v in family.versions if v.active]
        assert active.state == sampler_pb2.VERSION_STATE_READY
    assert {v.model for v in client.list_versions()} == {"pony_v7", "pony_v6"}
    assert {v.model for v in client.list_versions(model="pony_v6")} == {"pony_v6"}


@pytest.mark.triton
def test_a_v6_version_loads_on_its_own_and_a_pinned_old_version_is_failed_precondition(
    sampler_stack: SamplerStack, client, tiny_models: Path
) -> None:
    import shutil

    from sqlalchemy import select

    from pony_common.catalog import catalog_for
    from pony_common.catalog.models import ModelVersionRow

    v7_before = [(v.version, v.active) for v in client.list_versions(model="pony_v7")]
    v6_before = max(v.version for v in client.list_versions(model="pony_v6") if v.active)
    # A V7 checkpoint is not a V6 version.
    with pytest.raises(grpc.RpcError) as err:
        client.load_version(str(tiny_models / "auraflow"), model="pony_v6")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("uri:")

    # A copy of the tiny SDXL: a new version, in a folder of its own, whose images the session's other V6 tests
    # (which compare with the tiny SDXL) still expect.
    checkpoint = Path(runs_root(sampler_stack.settings)) / "v6-swap" / "final"
    shutil.copytree(tiny_models / "sdxl", checkpoint)
    loaded = client.load_version(str(checkpoint), source_run_id="run-v6", model="pony_v6", timeout=300)
    assert loaded.model == "pony_v6" and loaded.version == v6_before + 1 and loaded.active
    assert loaded.uri == str(checkpoint) and loaded.state == sampler_pb2.VERSION_STATE_READY

    resp = client.generate("a pony", model="pony_v6", seed=3, steps=2)
    assert resp.provenance.model == "pony_v6" and resp.provenance.model_version == str(loaded.version)
    pinned = client.generate("a pony", model="pony_v6", model_version=loaded.version, seed=3, steps=2)
    assert pinned.provenance.model_version == str(loaded.version)
    with pytest.raises(grpc.RpcError) as err:
        client.generate("a pony", model="pony_v6", model_version=v6_before, seed=3, steps=2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details().startswith("model_version:"), err.value.details()
    # pony_v7 is untouched.
    assert [(v.version, v.active) for v in client.list_versions(model="pony_v7")] == v7_before
    assert client.generate("a pony", seed=3, steps=1).provenance.model == "pony_v7"
    with catalog_for(sampler_stack.settings.database_url).session() as s:
        rows = {r.version: r for r in s.scalars(select(ModelVersionRow).where(ModelVersionRow.name == "pony_v6"))}
    assert rows[loaded.version].source_run_id == "run-v6" and rows[loaded.version].active
    assert not rows[v6_before].active


@pytest.mark.triton
def test_ponyctl_generate_model_pony_v6(sampler_stack: SamplerStack, monkeypatch, tmp_path, capsys) -> None:
    from pony_common.cli.main import main

    monkeypatch.setenv("PONY_SAMPLER_ADDR", sampler_stack.addr)
    monkeypatch.setenv("PONY_AUTH_TOKEN", sampler_stack.settings.auth_token)
    out = tmp_path / "v6.png"
    argv = [
        "generate",
        "a pony",
        "--model",
        "pony_v6",
        "--seed",
        "2",
        "--steps",
        "1",
        "--score",
        "8",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert f"{out}\tseed=2\tmodel=pony_v6:" in capsys.readouterr().out
    assert main(["generate", "--read", str(out), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["model"] == "pony_v6" and params["prompt"].startswith("score_8_up, score_7_up")


# --- without Triton ---


def test_ponyctl_generate_refuses_an_unknown_model_with_exit_2(tmp_path, capsys) -> None:
    from pony_common.cli.main import main

    assert main(["generate", "a pony", "--model", "pony_v5", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "pony_v5" in err


def test_a_family_that_is_not_served_is_invalid_argument_naming_model(tiny_models: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    settings = Settings.from_env({}, state_dir=str(tmp_path), models_dir=str(tiny_models))
    assert list(served(settings)) == ["pony_v7"]  # the default serves V7 alone
    validator = RequestValidator(
        settings, {"pony_v7": AutoTokenizer.from_pretrained(tiny_models / "auraflow/tokenizer")}
    )
    with pytest.raises(InvalidArgument) as err:
        validator.spec(GenerationInput(prompt="a pony", model="pony_v6"))
    assert err.value.field == "model" and "not served" in str(err.value)
    spec = validator.spec(GenerationInput(prompt="a pony", tags=PromptTags(score=8)))
    assert (spec.model, spec.prompt) == ("pony_v7", "score_9, score_8, a pony")


def test_settings_name_the_families_served_and_the_default(tmp_path: Path) -> None:
    env = {"PONY_SAMPLER_FAMILIES": "pony_v7,pony_v6", "PONY_SAMPLER_DEFAULT_MODEL": "pony_v6"}
    families = served(Settings.from_env(env, models_dir=str(tmp_path)))
    assert [(f.name, f.is_default) for f in families.values()] == [("pony_v7", False), ("pony_v6", True)]
    assert families["pony_v6"].model_path == str(tmp_path / "sdxl")
    assert (families["pony_v6"].limits.steps, families["pony_v6"].limits.guidance) == (25, 7.0)
    with pytest.raises(ValueError, match="not served"):
        served(Settings.from_env({"PONY_SAMPLER_DEFAULT_MODEL": "pony_v6"}))
    with pytest.raises(ValueError, match="unknown model family"):
        served(Settings.from_env({"PONY_SAMPLER_FAMILIES": "pony_v7,pony_v9"}))


def test_the_repository_renders_one_triton_model_per_family_from_one_template(tiny_models: Path, tmp_path) -> None:
    settings = Settings.from_env({}, state_dir=str(tmp_path), models_dir=str(tiny_models))
    for family in ("pony_v7", "pony_v6"):
        repository = ModelRepository(tmp_path / "repo", family)
        repository.render(settings)
        config = (tmp_path / "repo" / family / "config.pbtxt").read_text()
        assert f'name: "{family}"' in config and f'key: "family" value: {{ string_value: "{family}" }}' in config
        (v1,) = repository.versions()
        assert v1.uri == str(tiny_models / ("auraflow" if family == "pony_v7" else "sdxl"))
    model_files = [(tmp_path / "repo" / f / "1" / "model.py").read_bytes() for f in ("pony_v7", "pony_v6")]
    assert model_files[0] == model_files[1]
