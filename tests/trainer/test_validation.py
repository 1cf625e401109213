"""Validation images while training: fixed prompts and seeds every N steps and at each stage end, with the current
(EMA) weights, as PNGs and `validation` events; the same seed gives the same image and training is undisturbed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AuraFlowPipeline
from PIL import Image

from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.trainer.events import EventWriter
from services.trainer.spec import ValidationSpec, parse_spec
from services.trainer.training.loop import run_training
from services.trainer.training.validation import validation_due
from tests.trainer.conftest import tiny_spec

PROMPTS = ["a red square", "a blue square"]
SEEDS = [5, 6]


def test_validation_images_appear_at_the_right_steps_with_the_current_weights(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    validation = {"prompts": PROMPTS, "seeds": SEEDS, "every": 2, "steps": 2, "guidance_scale": 1.5}
    doc = tiny_spec(
        manifest,
        stages=[
            {"name": "low", "resolution": 32, "steps": 3, "batch_size": 2, "bucket_step": 16},
            {"name": "high", "resolution": 32, "steps": 3, "batch_size": 2, "bucket_step": 16},
        ],
        checkpoint={"every": 100},
        ema={"enabled": True, "decay": 0.5},
    )
    events = EventWriter(io.StringIO())
    spec = parse_spec({**doc, "output": str(tmp_path / "v"), "validation": validation})
    result = run_training(spec, model_settings, run_id="v", events=events)
    shown = [e for e in events.events if e["kind"] == "validation"]
    # every 2 steps, plus the end of each stage (3 and 6); 6 once
    assert [(e["step"], e["stage"]) for e in shown] == [(2, "low"), (3, "low"), (4, "high"), (6, "high")]
    for event in shown:
        assert event["prompts"] == PROMPTS and event["seeds"] == SEEDS
        assert len(event["images"]) == len(PROMPTS) * len(SEEDS)
        assert all(p.startswith(f"validation/step-{event['step']:08d}/") for p in event["images"])
    files = {p: np.asarray(Image.open(tmp_path / "v" / p)) for p in shown[-1]["images"]}
    assert all(a.shape == (32, 32, 3) for a in files.values())
    red5, red6 = files[shown[-1]["images"][0]], files[shown[-1]["images"][1]]
    assert not np.array_equal(red5, red6)  # another seed, another image
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "v" / shown[0]["images"][0])), red5)  # weights moved

    # The final pipeline carries the EMA weights of step 6: the same prompt and seed give the same image.
    pipe = AuraFlowPipeline.from_pretrained(result.final_path)
    pipe.set_progress_bar_config(disable=True)
    again = pipe(
        PROMPTS[0],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.5,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(SEEDS[0]),
    ).images[0]
    assert np.array_equal(np.asarray(again), red5)

    # Rendering changed neither the trained weights nor the RNG: the same run without validation has the same losses.
    plain = run_training(
        parse_spec({**doc, "output": str(tmp_path / "plain")}),
        model_settings,
        run_id="plain",
        events=EventWriter(io.StringIO()),
    )
    assert plain.losses == result.losses


def test_validation_is_due_every_n_steps_and_at_stage_ends() -> None:
    spec = ValidationSpec(prompts=("x",), every=4)
    assert [s for s in range(1, 11) if validation_due(spec, s, stage_end=10)] == [4, 8, 10]
    only_ends = ValidationSpec(prompts=("x",), every=0)
    assert [s for s in range(1, 11) if validation_due(only_ends, s, stage_end=10)] == [10]
    assert not any(validation_due(ValidationSpec(prompts=()), s, stage_end=10) for s in range(1, 11))


@pytest.mark.parametrize(
    ("validation", "field"),
    [
        ({"prompts": ["ok"], "seeds": [-1]}, "spec.validation.seeds[0]"),
        ({"prompts": ["ok"], "seeds": [1, 1]}, "spec.validation.seeds"),
        ({"prompts": ["ok"], "resolution": 40}, "spec.validation.resolution"),
        ({"prompts": [3]}, "spec.validation.prompts[0]"),
    ],
)
def test_a_bad_validation_spec_names_the_field(manifest: Path, validation: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_spec(tiny_spec(manifest, validation=validation))
    assert info.value.field == field
