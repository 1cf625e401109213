"""The rectified flow FlowMatchEulerDiscreteScheduler samples from: x_t = (1-σ)x0 + σ·noise, target noise - x0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from services.trainer.spec import FlowSpec


@dataclass
class FlowBatch:
    noisy: torch.Tensor  # x_t, the transformer's input
    timesteps: torch.Tensor  # the scheduler's timesteps (0..1000]
    sigmas: torch.Tensor  # σ per sample
    target: torch.Tensor  # noise - x0, what the transformer predicts


def training_scheduler(base: FlowMatchEulerDiscreteScheduler, spec: FlowSpec) -> FlowMatchEulerDiscreteScheduler:
    """The base model's scheduler config, with the spec's shift when given: its 1000 timesteps/sigmas are the grid."""
    config = dict(base.config)
    if spec.shift is not None:
        config["shift"] = spec.shift
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
