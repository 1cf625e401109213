"""The flow shift per stage: a number, "auto" (SimpleTuner's resolution-dependent shift, diffusers' calculate_shift
constants) or inherited from flow.shift / the base model's scheduler."""

from __future__ import annotations

import math

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from services.trainer.spec import FlowSpec, StageSpec
from services.trainer.training.flow import auto_shift, image_seq_len, stage_shift, training_scheduler


def test_auto_shift_follows_the_token_count_between_the_reference_points() -> None:
    assert auto_shift(256) == pytest.approx(math.exp(0.5))
    assert auto_shift(4096) == pytest.approx(math.exp(1.15))
    assert auto_shift(1024) == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840))
    # AuraFlow: 8x VAE, 2x2 patches -> 1024 px is 64x64 = 4096 tokens, 512 px 1024 tokens
    assert image_seq_len(1024, 8, 2) == 4096 and image_seq_len(512, 8, 2) == 1024
    assert auto_shift(image_seq_len(1024, 8, 2)) > auto_shift(image_seq_len(512, 8, 2)) > 1.0


def test_a_stage_shift_overrides_the_flow_shift_which_overrides_the_base() -> None:
    low = StageSpec(name="low", resolution=512, steps=1)
    assert stage_shift(low, FlowSpec(shift=None), 1024) is None  # the base scheduler's
    assert stage_shift(low, FlowSpec(shift=2.0), 1024) == 2.0
    assert stage_shift(low, FlowSpec(shift="auto"), 1024) == pytest.approx(auto_shift(1024))
    high = StageSpec(name="high", resolution=1024, steps=1, shift="auto")
    assert stage_shift(high, FlowSpec(shift=2.0), 4096) == pytest.approx(auto_shift(4096))
    fixed = StageSpec(name="fixed", resolution=1024, steps=1, shift=5.0)
    assert stage_shift(fixed, FlowSpec(shift="auto"), 4096) == 5.0


def test_the_training_scheduler_takes_the_resolved_shift() -> None:
    base = FlowMatchEulerDiscreteScheduler(shift=1.73)
    assert training_scheduler(base, FlowSpec()).config.shift == 1.73
    assert training_scheduler(base, FlowSpec(shift=3.0)).config.shift == 3.0
    assert training_scheduler(base, FlowSpec(shift="auto")).config.shift == 1.73  # auto needs a resolution
    resolved = training_scheduler(base, FlowSpec(shift="auto"), shift=auto_shift(4096))
    assert resolved.config.shift == pytest.approx(math.exp(1.15))
    # a larger shift moves the σ table towards noise
    assert resolved.sigmas.mean() > training_scheduler(base, FlowSpec()).sigmas.mean()


@pytest.mark.parametrize(
    ("where", "doc"),
    [
        ("spec.stages[0].shift", {"stages": [{"resolution": 256, "steps": 1, "shift": "banana"}]}),
        ("spec.flow.shift", {"stages": [{"resolution": 256, "steps": 1}], "flow": {"shift": "fast"}}),
    ],
)
def test_a_shift_that_is_neither_a_number_nor_auto_is_refused_by_name(where: str, doc: dict) -> None:
    from pony_common.errors import InvalidArgument
    from services.trainer.spec import parse_spec

    with pytest.raises(InvalidArgument) as err:
        parse_spec({"name": "x", "manifest": "m", **doc})
    assert err.value.field == where and "'auto'" in str(err.value)
    assert parse_spec({"name": "x", "manifest": "m", "stages": [{"resolution": 256, "steps": 1, "shift": "3"}]})
