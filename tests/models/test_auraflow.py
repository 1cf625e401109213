"""The tiny AuraFlow pipeline: save/reload round trip and its scheduler and tokenizer settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

from pony_common.models.auraflow import (
    MAX_SEQUENCE_LENGTH,
    SCHEDULER_SHIFT,
    build_auraflow_components,
    load_pipeline,
)
from services.stack.tiny import auraflow_tokenizer

PROMPT = "score_9, a pony in a meadow, watercolor"


def _image(pipe: AuraFlowPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    out = pipe(
        PROMPT,
        num_inference_steps=4,
        height=kwargs.pop("height", 64),
        width=kwargs.pop("width", 64),
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    return out.images[0]


def test_reloaded_pipeline_gives_the_identical_image(tiny_dirs: dict[str, Path]) -> None:
    built = AuraFlowPipeline(**build_auraflow_components(auraflow_tokenizer(), size="tiny", seed=2))
    built.set_progress_bar_config(disable=True)
    loaded = load_pipeline(str(tiny_dirs["auraflow"]))
    expected = _image(built)
    assert expected.shape == (64, 64, 3)
    assert np.array_equal(_image(loaded), expected)
    assert np.array_equal(_image(loaded), expected)  # same seed, same image
    assert not np.array_equal(_image(loaded, seed=1), expected)


def test_scheduler_and_tokenizer_settings_survive_the_round_trip(tiny_dirs: dict[str, Path]) -> None:
    pipe = load_pipeline(str(tiny_dirs["auraflow"]))
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == SCHEDULER_SHIFT == 1.73
    assert pipe.scheduler.config.use_dynamic_shifting is False
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.tokenizer.model_max_length == MAX_SEQUENCE_LENGTH == 256
    ids = pipe.tokenizer("a pony in a meadow")["input_ids"]
    assert ids[-1] == pipe.tokenizer.eos_token_id and pipe.tokenizer.unk_token_id not in ids
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == 64


def test_other_sizes_and_batches(tiny_dirs: dict[str, Path]) -> None:
    pipe = load_pipeline(str(tiny_dirs["auraflow"]))
    image = _image(pipe, height=128, width=192, num_images_per_prompt=2)
    assert image.shape == (128, 192, 3)


def test_unknown_size_is_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        build_auraflow_components(auraflow_tokenizer(), size="medium")  # type: ignore[arg-type]


def test_full_size_has_the_real_shapes() -> None:
    # On the meta device: shapes and parameter counts without allocating 8B parameters.
    before = torch.get_default_dtype()
    parts = build_auraflow_components(auraflow_tokenizer(), size="full", device="meta", dtype=torch.bfloat16)
    assert torch.get_default_dtype() == before
    billions = {
        name: sum(p.numel() for p in parts[name].parameters()) / 1e9 for name in ("transformer", "text_encoder", "vae")
    }
    assert 6.8 < billions["transformer"] < 6.9
    assert 1.2 < billions["text_encoder"] < 1.25
    assert 0.08 < billions["vae"] < 0.09
    assert next(parts["transformer"].parameters()).dtype == torch.bfloat16
    assert parts["transformer"].config.pos_embed_max_size == 9216
    assert parts["text_encoder"].config.vocab_size == 32128
