"""LoRA adapters without Triton: the registry in the catalog (register, versions, remove, resolve and its errors by
field; trainer-published rows keep working), and the adapter cache over real diffusers pipelines (a batch without
adapters, or with a zero-weight one, is exactly the plain pipeline; LRU eviction; a changed file is refused).

`make_lora` writes a LoRA the way diffusers does (`save_lora_weights`) from peft layers on the tiny model's
denoiser, with NON-zero lora_B (peft starts B at zero, which would leave every image unchanged)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from pony_common.catalog import catalog_for
from pony_common.catalog.models import AdapterRow
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.sampler.adapters import AdapterRegistry, read_lora_file
from services.sampler.generation import AdapterRequest
from services.sampler.lora import LORA_FILE, AdapterCache, AdapterError, AdapterSpec, batch_key, parse_adapters

FAMILIES = {"pony_v7": ("auraflow", "transformer"), "pony_v6": ("sdxl", "unet")}


def make_lora(models: Path, out: Path, family: str = "pony_v7", seed: int = 0, scale: float = 1.0) -> Path:
    """`out/pytorch_lora_weights.safetensors`: rank-4 LoRA (alpha 8) on the attention projections of the tiny
    `family` denoiser, A and B drawn from `seed` (B scaled by `scale`), saved by the pipeline's `save_lora_weights`
    with the LoraConfig as diffusers' adapter metadata. Returns `out`."""
    from diffusers import AuraFlowPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, attr = FAMILIES[family]
    pipe_cls = AuraFlowPipeline if family == "pony_v7" else StableDiffusionXLPipeline
    sub = models / folder / attr
    if family == "pony_v7":
        from diffusers import AuraFlowTransformer2DModel as Denoiser
    else:
        from diffusers import UNet2DConditionModel as Denoiser
    model = Denoiser.from_pretrained(sub)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_adapter(config)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    for key in state:
        if "lora_B" in key:
            state[key] *= scale
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # B is not zero: the LoRA acts
    pipe_cls.save_lora_weights(
        out, **{f"{attr}_lora_layers": state, f"{attr}_lora_adapter_metadata": model.peft_config["default"].to_dict()}
    )
    return out


@pytest.fixture(scope="module")
def loras(tiny_models: Path) -> dict[str, Path]:
    base = tiny_models / "loras_unit"
    return {
        "v7": make_lora(tiny_models, base / "v7", "pony_v7", seed=1, scale=30.0),
        "v7b": make_lora(tiny_models, base / "v7b", "pony_v7", seed=2, scale=30.0),
        "v6": make_lora(tiny_models, base / "v6", "pony_v6", seed=3),
    }


@pytest.fixture
def registry(model_settings: Settings) -> AdapterRegistry:
    settings = model_settings.replace(sampler_families=("pony_v7", "pony_v6"))
    return AdapterRegistry(settings, catalog_for(settings.database_url))


# --- the registry ---


def test_register_reads_the_file_and_numbers_versions(registry: AdapterRegistry, loras: dict[str, Path]) -> None:
    first = registry.register("style-a", str(loras["v7"]))  # a folder holding pytorch_lora_weights.safetensors
    info = read_lora_file(str(loras["v7"] / LORA_FILE))
    assert (first.version, first.family, first.rank, first.alpha) == (1, "pony_v7", 4, 8.0)
    assert first.sha256 == info.sha256 and first.uri == str((loras["v7"] / LORA_FILE).resolve())
    assert first.run_id == "" and len(first.tensor_sha256) == 64 and first.tensor_sha256 != first.sha256
    second = registry.register("style-a", str(loras["v7b"] / LORA_FILE))  # the file itself
    assert second.version == 2
    v6 = registry.register("style-a6", str(loras["v6"]), family="pony_v6")
    assert v6.family == "pony_v6"
    assert [(a.name, a.version) for a in registry.list("pony_v7")] == [("style-a", 1), ("style-a", 2)]


@pytest.mark.parametrize(
    ("name", "uri", "family", "field"),
    [
        ("bad name", "v7", "", "name"),
        ("a,b", "v7", "", "name"),
        ("ok", "v7", "pony_v9", "family"),
        ("ok", "/etc/passwd", "", "uri"),  # outside the model roots: refused without saying whether it exists
        ("ok", "missing", "", "uri"),
        ("ok", "not-lora", "", "uri"),
        ("ok", "v6", "pony_v7", "family"),  # an SDXL LoRA for the AuraFlow family
    ],
)
def test_register_refuses_by_field(
    registry: AdapterRegistry, loras: dict[str, Path], tiny_models: Path, name: str, uri: str, family: str, field: str
) -> None:
    bogus = tiny_models / "loras_unit" / "not-lora"
    bogus.mkdir(parents=True, exist_ok=True)
    (bogus / LORA_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    paths = {
        "v7": str(loras["v7"]),
        "v6": str(loras["v6"]),
        "missing": str(tiny_models / "nope"),
        "not-lora": str(bogus),
    }
    with pytest.raises(InvalidArgument) as err:
        registry.register(name, paths.get(uri, uri), family)
    assert err.value.field == field


def test_resolve_fills_versions_and_weights_and_names_bad_fields(
    registry: AdapterRegistry, loras: dict[str, Path]
) -> None:
    registry.register("style-a", str(loras["v7"]))
    newest = registry.register("style-a", str(loras["v7b"]))
    registry.register("style-b", str(loras["v7"]))
    registry.register("style-6", str(loras["v6"]), family="pony_v6")
    got = registry.resolve([AdapterRequest("style-a"), AdapterRequest("style-b", 1, 0.5)], "pony_v7")
    assert [(a.name, a.version, a.weight) for a in got] == [("style-a", 2, 1.0), ("style-b", 1, 0.5)]
    assert got[0].sha256 == newest.sha256 and got[0].lora_hash == newest.tensor_sha256[:12]
    assert registry.resolve([AdapterRequest("style-a", 1)], "pony_v7")[0].version == 1
    assert registry.resolve([], "pony_v7") == ()
    cases = [
        ([AdapterRequest("nope")], "adapters[0].name"),
        ([AdapterRequest("style-a"), AdapterRequest("")], "adapters[1].name"),
        ([AdapterRequest("style-a", 9)], "adapters[0].version"),
        ([AdapterRequest("style-6")], "adapters[0]"),  # another family's
        ([AdapterRequest("style-a"), AdapterRequest("style-a", 1)], "adapters[1]"),  # named twice
        ([AdapterRequest("style-a", 0, math.nan)], "adapters[0].weight"),
        ([AdapterRequest("style-a", 0, 4.5)], "adapters[0].weight"),
        ([AdapterRequest("style-a", 0, -math.inf)], "adapters[0].weight"),
        ([AdapterRequest("style-a")] * 5, "adapters"),  # more than PONY_SAMPLER_MAX_ADAPTERS (4)
    ]
    for refs, field in cases:
        with pytest.raises(InvalidArgument) as err:
            registry.resolve(refs, "pony_v7")
        assert err.value.field == field, (refs, err.value)


def test_remove_one_version_or_all_and_numbers_are_not_reused(
    registry: AdapterRegistry, loras: dict[str, Path]
) -> None:
    registry.register("style-a", str(loras["v7"]))
    registry.register("style-a", str(loras["v7b"]))
    assert [a.version for a in registry.remove("style-a", 2)] == [2]
    assert registry.resolve([AdapterRequest("style-a")], "pony_v7")[0].version == 1  # the newest left
    with pytest.raises(InvalidArgument) as err:
        registry.resolve([AdapterRequest("style-a", 2)], "pony_v7")
    assert err.value.field == "adapters[0].version"
    assert registry.register("style-a", str(loras["v7b"])).version == 3  # 2 stays taken
    assert [a.version for a in registry.remove("style-a")] == [1, 3]
    with pytest.raises(InvalidArgument) as err:
        registry.resolve([AdapterRequest("style-a")], "pony_v7")
    assert err.value.field == "adapters[0].name"
    with pytest.raises(InvalidArgument):
        registry.remove("style-a")
    assert registry.list() == []


def test_trainer_published_rows_resolve_and_registered_rows_have_no_run(
    registry: AdapterRegistry, loras: dict[str, Path]
) -> None:
    info = read_lora_file(str(loras["v7"] / LORA_FILE))
    with registry.catalog.session() as s:  # a row as services/trainer/publish.py writes it (folder uri, a run)
        s.add(
            AdapterRow(
                name="run-lora",
                version=1,
                family="pony_v7",
                base_model_version=None,
                base_model_uri="x",
                uri=str(loras["v7"]),
                sha256=info.sha256,
                rank=4,
                alpha=8.0,
                run_id="run-1",
            )
        )
    registry.register("mine", str(loras["v7"]))
    registry.register("mine", str(loras["v7b"]))  # two rows without a run: run_id is nullable and still unique
    (got,) = registry.resolve([AdapterRequest("run-lora")], "pony_v7")
    assert (got.version, got.uri, got.lora_hash) == (1, str(loras["v7"]), info.tensor_sha256[:12])
    with registry.catalog.session() as s:
        assert s.scalar(select(AdapterRow.tensor_sha256).where(AdapterRow.name == "run-lora")) == info.tensor_sha256
    with pytest.raises(IntegrityError), registry.catalog.session() as s:
        s.add(
            AdapterRow(
                name="run-lora",
                version=2,
                family="pony_v7",
                base_model_uri="x",
                uri="u",
                sha256="0" * 64,
                rank=4,
                alpha=8.0,
                run_id="run-1",
            )
        )


# --- the adapter cache over real pipelines ---


def _spec(name: str, folder: Path, weight: float = 1.0, version: int = 1) -> AdapterSpec:
    info = read_lora_file(str(folder / LORA_FILE))
    return AdapterSpec(name, version, str(folder), info.sha256, weight)


def _run(pipe, steps: int = 2) -> np.ndarray:
    return pipe(
        prompt="a pony",
        num_inference_steps=steps,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def auraflow(tiny_models: Path):
    from pony_common.models.auraflow import load_pipeline

    return load_pipeline(str(tiny_models / "auraflow"))


def test_the_cache_applies_sets_exactly_and_none_is_the_plain_pipeline(auraflow, loras: dict[str, Path]) -> None:
    cache = AdapterCache(auraflow, capacity=4)
    plain = _run(auraflow)
    cache.activate([_spec("a", loras["v7"])])
    with_a = _run(auraflow)
    assert np.abs(with_a - plain).max() > 1e-3  # the LoRA changes the image
    cache.activate([])
    assert np.array_equal(_run(auraflow), plain)  # no adapters: exactly the plain pipeline
    cache.activate([_spec("a", loras["v7"], weight=0.0)])
    assert np.array_equal(_run(auraflow), plain)  # a zero weight: exactly no adapter
    cache.activate([_spec("a", loras["v7"]), _spec("b", loras["v7b"], 0.5)])
    both = _run(auraflow)
    cache.activate([_spec("a", loras["v7"])])
    assert np.array_equal(_run(auraflow), with_a)  # back to one adapter: the same image as before
    assert not np.array_equal(both, with_a)
    assert cache.loads == 2  # each file loaded once
    cache.activate([])


def test_lru_eviction_deletes_the_least_recently_used_adapter(auraflow, loras: dict[str, Path]) -> None:
    cache = AdapterCache(auraflow, capacity=2)
    a, b = _spec("evict-a", loras["v7"]), _spec("evict-b", loras["v7b"])
    c = _spec("evict-c", loras["v7"], version=2)  # the same file as another version: another adapter
    cache.activate([a])
    cache.activate([b])
    cache.activate([a])  # a is now the most recently used
    cache.activate([c])
    assert list(cache.loaded) == [a.adapter_name, c.adapter_name]  # b evicted
    present = {n for names in auraflow.get_list_adapters().values() for n in names}
    assert b.adapter_name not in present and {a.adapter_name, c.adapter_name} <= present
    cache.activate([b, c])  # a set larger than what is left keeps both of its adapters
    assert set(cache.loaded) == {b.adapter_name, c.adapter_name}
    cache.evict(list(cache.loaded))
    cache.activate([])


def test_a_file_that_changed_after_registration_is_refused(auraflow, loras: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec("changed", loras["v7"])
    copy = tmp_path / "changed.safetensors"
    copy.write_bytes((loras["v7"] / LORA_FILE).read_bytes() + b" ")
    cache = AdapterCache(auraflow)
    with pytest.raises(AdapterError, match="sha256"):
        cache.activate([AdapterSpec(spec.name, 1, str(copy), spec.sha256)])
    assert not cache.loaded


def test_the_batch_key_and_the_adapters_input() -> None:
    a = AdapterSpec("a", 1, "/x", "a" * 64, 0.5)
    assert batch_key([a]) == batch_key([AdapterSpec("a", 1, "/y", "a" * 64, 0.5)])
    assert batch_key([a]) != batch_key([AdapterSpec("a", 1, "/x", "a" * 64, 0.25)])  # another weight
    assert batch_key([a]) != batch_key([AdapterSpec("a", 2, "/x", "a" * 64, 0.5)])  # another version
    assert batch_key([a]) != batch_key([AdapterSpec("a", 1, "/x", "b" * 64, 0.5)])  # another file
    assert batch_key([AdapterSpec("a", 1, "/x", "a" * 64, 0.0)]) == batch_key([]) == ()  # zero weight = none
    from services.sampler.lora import dump_adapters

    assert parse_adapters(dump_adapters([a])) == (a,)
    assert parse_adapters("") == parse_adapters(b"[]") == ()
    for bad in ("{", "{}", '[{"name": "a"}]', '[{"name": "a", "version": 1, "uri": "u", "sha256": "x"}]'):
        with pytest.raises(AdapterError):
            parse_adapters(bad)


def test_a_model_with_fused_qkv_refuses_adapters(tiny_models: Path, loras: dict[str, Path]) -> None:
    from pony_common.models.auraflow import load_pipeline

    pipe = load_pipeline(str(tiny_models / "auraflow"))
    pipe.transformer.fuse_qkv_projections()  # the GPU fast path's fuse_qkv
    cache = AdapterCache(pipe)
    cache.activate([])  # no adapters: fine
    with pytest.raises(AdapterError, match="fused QKV"):
        cache.activate([_spec("a", loras["v7"])])
