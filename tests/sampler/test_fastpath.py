"""The sampler's fast path (services/sampler/fastpath.py) on the CPU with both families' tiny diffusers pipelines:
uint8 made from `output_type="pt"` equals the numpy path bit for bit; torch.compile (inductor on the CPU) warmed on
shape A serves A without recompiling and serves an unwarmed shape B eager, with B's right image; previews every k
steps without waiting; fused QKV keeps the image; fp8 is refused on a CPU naming its setting."""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from services.sampler.fastpath import (
    LATENT_RGB,
    LATENT_RGB_BIAS,
    FastPathOptions,
    PreviewQueue,
    Shape,
    parse_shapes,
    prepare,
    step_callback,
    to_uint8,
)

FAMILIES = {"pony_v7": ("auraflow", "pony_common.models.auraflow"), "pony_v6": ("sdxl", "pony_common.models.sdxl")}


def load(tiny_models: Path, family: str) -> Any:
    folder, module = FAMILIES[family]
    return importlib.import_module(module).load_pipeline(str(tiny_models / folder))


def generate(pipe: Any, width: int, height: int, output_type: str, seed: int = 7, **kwargs: Any) -> Any:
    with torch.inference_mode():
        return pipe(
            prompt=["a pony in a meadow"],
            negative_prompt=[""],
            width=width,
            height=height,
            num_inference_steps=2,
            guidance_scale=3.5,
            generator=[torch.Generator().manual_seed(seed)],
            output_type=output_type,
            **kwargs,
        ).images


def numpy_path(images: np.ndarray) -> np.ndarray:
    """What the Triton model did before the fast path (and what the pipeline's PIL output does)."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_uint8_from_pt_equals_the_numpy_path_bit_for_bit(tiny_models: Path, family: str) -> None:
    pipe = load(tiny_models, family)
    expected = numpy_path(generate(pipe, 64, 48, "np"))
    got = to_uint8(generate(pipe, 64, 48, "pt"))
    assert got.dtype == np.uint8 and got.shape == expected.shape == (1, 48, 64, 3)
    assert np.array_equal(got, expected)
    # bf16 images (what a GPU pipeline gives) convert in float32, as the numpy path's `.float()` does.
    pt = torch.rand(2, 3, 8, 8).to(torch.bfloat16)
    assert np.array_equal(to_uint8(pt), numpy_path(pt.float().permute(0, 2, 3, 1).numpy()))


def test_compiled_shape_runs_without_recompiling_and_others_run_eager(tiny_models: Path) -> None:
    pipe = load(tiny_models, "pony_v7")
    eager_a, eager_b = generate(pipe, 64, 64, "np"), generate(pipe, 32, 48, "np")
    fast = prepare(
        pipe, FastPathOptions(compile_mode="reduce-overhead", shapes=parse_shapes("64x64x1"), warmup_steps=1)
    )
    assert fast.compiled and fast.is_warm(64, 64, 1, 3.5) and not fast.is_warm(32, 48, 1, 3.5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the warm-up compiled the transformer

    with fast.running(64, 64, 1, 3.5) as warm:
        compiled_a = to_uint8(generate(pipe, 64, 64, "pt"))
    assert warm and fast.eager_batches == 0
    assert counters["stats"]["unique_graphs"] == graphs  # shape A: the warmed graph, no recompile
    # Inductor may fuse float operations differently from eager: the same image up to rounding.
    assert np.abs(compiled_a.astype(int) - numpy_path(eager_a).astype(int)).max() <= 2

    with fast.running(32, 48, 1, 3.5) as warm:
        eager_run_b = to_uint8(generate(pipe, 32, 48, "pt"))
    assert not warm and fast.eager_batches == 1
    assert counters["stats"]["unique_graphs"] == graphs  # shape B: nothing compiled in service
    assert np.array_equal(eager_run_b, numpy_path(eager_b))  # eager: exactly the plain pipeline's image

    # A warmed shape whose guards fail for another reason never compiles in service either (eager_on_recompile).
    with fast.running(64, 64, 1, 3.5), torch.inference_mode():
        pipe.transformer(
            hidden_states=torch.randn(1, 4, 8, 10),
            encoder_hidden_states=torch.randn(1, 256, 32),
            timestep=torch.tensor([500.0]),
        )
    assert counters["stats"]["unique_graphs"] == graphs


def test_previews_every_k_steps_come_from_the_device_path(tiny_models: Path) -> None:
    pipe = load(tiny_models, "pony_v7")
    queue = PreviewQueue(every=2)
    sent: list[tuple[int, list[int]]] = []
    seen: dict[int, np.ndarray] = {}

    def keep(step: int, ready: list[Any]) -> None:
        sent.append((step, [p.step for p in ready]))
        for p in ready:
            seen[p.step] = p.images

    latents: dict[int, np.ndarray] = {}
    inner = step_callback(None, queue, keep)

    def on_step(p: Any, step: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents[step + 1] = kwargs["latents"].float().numpy().copy()
        return inner(p, step, t, kwargs)

    with torch.inference_mode():
        pipe(
            prompt="a pony",
            width=64,
            height=64,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
            callback_on_step_end=on_step,
        )
    # On the CPU a preview is ready at its own step: steps 2 and 4 of 5.
    assert sent == [(1, []), (2, [2]), (3, []), (4, [4]), (5, [])]
    assert queue.drain() == []
    for step, images in seen.items():
        rgb = np.einsum("nchw,cr->nhwr", latents[step], np.array(LATENT_RGB, np.float32)) + np.array(LATENT_RGB_BIAS)
        expected = ((rgb + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        assert images.shape == (1, 8, 8, 3) and images.dtype == np.uint8
        assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_qkv_keeps_the_image(tiny_models: Path, family: str) -> None:
    pipe = load(tiny_models, family)
    before = generate(pipe, 64, 64, "np")
    prepare(pipe, FastPathOptions(fuse_qkv=True))
    after = generate(pipe, 64, 64, "np")
    assert np.abs(numpy_path(after).astype(int) - numpy_path(before).astype(int)).max() <= 1


def test_fp8_is_refused_on_a_cpu_naming_the_setting(tiny_models: Path) -> None:
    pipe = load(tiny_models, "pony_v7")
    with pytest.raises(ValueError, match="PONY_SAMPLER_FP8"):
        prepare(pipe, FastPathOptions(fp8=True), "cpu")


def test_options_from_the_triton_parameters() -> None:
    assert parse_shapes(" 1024x1024x2, 832x1216") == (Shape(1024, 1024, 2), Shape(832, 1216, 1))
    with pytest.raises(ValueError, match="PONY_SAMPLER_COMPILE_SHAPES"):
        parse_shapes("1024x1000x1")
    with pytest.raises(ValueError, match="PONY_SAMPLER_COMPILE_SHAPES"):
        parse_shapes("big")
    with pytest.raises(ValueError, match="PONY_SAMPLER_PREVIEW_EVERY"):
        FastPathOptions(preview_every=0)
    off = FastPathOptions.from_params({"compile": "false", "compile_shapes": "64x64x1"})
    assert off.compile_mode == "" and off.shapes == (Shape(64, 64, 1),)
    on = FastPathOptions.from_params({"compile": "true", "compile_mode": "", "warmup": "512x512x28", "fp8": "true"})
    assert (on.compile_mode, on.shapes, on.fp8, on.preview_every) == ("reduce-overhead", (Shape(512, 512, 1),), True, 1)


def test_the_triton_model_serves_warmed_shapes_compiled_and_others_eager(tiny_models: Path, tmp_path: Path) -> None:
    """Through tritonserver (whose Python stub runs in the C locale): compiled and warmed at load on 64x64x1, the
    64 px image is the direct pipeline's (up to inductor's rounding), a 48 px one runs eager (logged) and is exactly
    the direct pipeline's; previews come every PONY_SAMPLER_PREVIEW_EVERY steps."""
    from PIL import Image

    from pony_common.testing import ServerLoop
    from services.sampler.app import create_service
    from services.sampler.client import SamplerClient
    from services.sampler.model import SamplerModel
    from tests.sampler_stack import stack_settings

    settings = stack_settings(tmp_path / "state", tiny_models).replace(
        sampler_families=("pony_v7",),
        sampler_safety="off",
        sampler_compile=True,
        sampler_compile_shapes="64x64x1",
        sampler_preview_every=2,
        model_load_attempts=1,
        auth_token="",
    )
    pipe = load(tiny_models, "pony_v7")
    model = SamplerModel(settings)
    try:
        with ServerLoop() as servers:
            sampler = servers.start(settings, create_service(settings, model=model))
            with SamplerClient(settings.replace(sampler_addr=f"127.0.0.1:{sampler.port}")) as client:
                got = {}
                for size in (64, 48):
                    options = dict(width=size, height=size, steps=2, guidance=3.5, raw_prompt=True)
                    resp = client.generate("a pony in a meadow", seed=7, negative_prompt="", **options)
                    got[size] = np.asarray(Image.open(io.BytesIO(resp.images[0].png)).convert("RGB"))
                events = list(client.stream("a pony", seed=1, width=64, height=64, steps=5, preview=True))
    finally:
        model.teardown()
    assert np.abs(got[64].astype(int) - numpy_path(generate(pipe, 64, 64, "np"))[0].astype(int)).max() <= 2
    assert np.array_equal(got[48], numpy_path(generate(pipe, 48, 48, "np"))[0])
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert [(p.step, bool(p.preview_png)) for p in progress] == [
        (1, False),
        (2, True),
        (3, False),
        (4, True),
        (5, False),
    ]
    log = (tmp_path / "state" / "logs" / "tritonserver.log").read_text()
    assert "48x48, 1 images (guidance 3.50) was not warmed: runs eager (1 so far)" in log
    assert log.count("was not warmed") == 1  # the 64 px requests ran the warmed graph
