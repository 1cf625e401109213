"""The rectified flow FlowMatchEulerDiscreteScheduler samples from: x_t = (1-σ)x0 + σ·noise, target noise - x0;
the shift per stage (a number, or SimpleTuner's resolution-dependent "auto" shift)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from services.trainer.spec import FlowSpec, StageSpec

# diffusers' calculate_shift defaults (pipeline_flux), which SimpleTuner's auto shift uses: mu grows linearly with the
# image's token count from base_shift at 256 tokens to max_shift at 4096, and the shift is exp(mu).
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


@dataclass
class FlowBatch:
    noisy: torch.Tensor  # x_t, the transformer's input
    timesteps: torch.Tensor  # the scheduler's timesteps (0..1000]
    sigmas: torch.Tensor  # σ per sample
    target: torch.Tensor  # noise - x0, what the transformer predicts


def auto_shift(image_seq_len: int) -> float:
    """exp(mu), mu linear in the image's token count (256 -> 0.5, 4096 -> 1.15): 1.65 at 256 tokens, 3.16 at 4096."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    mu = BASE_SHIFT + slope * (image_seq_len - BASE_SEQ_LEN)
    return math.exp(mu)


def image_seq_len(resolution: int, vae_scale_factor: int, patch_size: int) -> int:
    """Transformer tokens of a `resolution`² image: (resolution / (vae factor · patch))²."""
    side = max(1, resolution // (vae_scale_factor * patch_size))
    return side * side


def resolve_shift(shift: float | str | None, seq_len: int) -> float | None:
    """A spec shift as a number: "auto" -> auto_shift(seq_len); None stays None (the base scheduler's)."""
    if shift == "auto":
        return auto_shift(seq_len)
    return None if shift is None else float(shift)


def stage_shift(stage: StageSpec | None, spec: FlowSpec, seq_len: int) -> float | None:
    """The stage's shift, else flow.shift, else None (the base scheduler's); "auto" at either level resolves here."""
    shift = stage.shift if stage is not None and stage.shift is not None else spec.shift
    return resolve_shift(shift, seq_len)


def training_scheduler(
    base: FlowMatchEulerDiscreteScheduler, spec: FlowSpec, *, shift: float | None = None
) -> FlowMatchEulerDiscreteScheduler:
    """The base model's scheduler config with `shift` (else the spec's numeric shift, else the base one): its 1000
    timesteps/sigmas are the grid. A spec shift of "auto" needs the resolution: pass `shift=stage_shift(...)`."""
    config = dict(base.config)
    if shift is None and spec.shift is not None and spec.shift != "auto":
        shift = float(spec.shift)
    if shift is not None:
        config["shift"] = shift
        config["use_dynamic_shifting"] = False
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def sample_indices(batch: int, spec: FlowSpec, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Indices into the scheduler's timestep table: u ~ U(0,1) or sigmoid(N(mean, std)) (SD3's logit-normal)."""
    if spec.weighting == "logit_normal":
        u = torch.sigmoid(spec.logit_mean + spec.logit_std * torch.randn(batch, generator=generator))
    else:
        u = torch.rand(batch, generator=generator)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def flow_batch(
    x0: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    spec: FlowSpec,
    generator: torch.Generator,
) -> FlowBatch:
    """Noise, σ and the velocity target for clean latents `x0` (B, C, h, w), on CPU with `generator`."""
    n = scheduler.config.num_train_timesteps
    idx = sample_indices(x0.shape[0], spec, n, generator)
    timesteps = scheduler.timesteps[idx].float()
    sigmas = scheduler.sigmas[idx].float()
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    s = sigmas.view(-1, 1, 1, 1).to(x0.dtype)
    noisy = (1.0 - s) * x0 + s * noise
    return FlowBatch(noisy=noisy, timesteps=timesteps, sigmas=sigmas, target=noise - x0)


def transformer_timestep(timesteps: torch.Tensor) -> torch.Tensor:
    """AuraFlow takes t/1000 in [0, 1] (t=1 noise), as AuraFlowPipeline passes it."""
    return timesteps / 1000.0
