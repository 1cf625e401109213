"""Validation images during training: fixed prompts and seeds rendered by AuraFlowPipeline with the current weights,
written as PNGs under <output>/validation/step-<NNNNNNNN>/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AuraFlowPipeline
from torch import nn

from services.trainer.spec import ValidationSpec

VALIDATION_DIR = "validation"


@dataclass(frozen=True)
class ValidationImage:
    prompt_index: int
    prompt: str
    seed: int
    path: str  # relative to the run output


def validation_due(spec: ValidationSpec, step: int, stage_end: int) -> bool:
    """Every `spec.every` steps (when > 0) and at the end of each stage; never without prompts."""
    if not spec.prompts:
        return False
    return step == stage_end or (spec.every > 0 and step % spec.every == 0)


def step_folder(step: int) -> str:
    return f"{VALIDATION_DIR}/step-{step:08d}"


@torch.no_grad()
def render_validation(
    base: AuraFlowPipeline,
    transformer: nn.Module,
    spec: ValidationSpec,
    *,
    resolution: int,
    max_sequence_length: int,
    output: Path,
    step: int,
    write: bool = True,
) -> list[ValidationImage]:
    """Renders every (prompt, seed) pair with `transformer` (the training module: under FSDP every rank must call
    this, as its forward is collective; only `write=True` saves). Each image starts from its own CPU generator
    seeded with its seed, so the same weights and seed give the same image. The global RNG is left untouched."""
    pipe = AuraFlowPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        transformer=transformer,
        scheduler=base.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    folder = step_folder(step)
    images: list[ValidationImage] = []
    was_training = transformer.training
    transformer.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            for i, prompt in enumerate(spec.prompts):
                for seed in spec.seeds:
                    image = pipe(
                        prompt,
                        height=resolution,
                        width=resolution,
                        num_inference_steps=spec.steps,
                        guidance_scale=spec.guidance_scale,
                        max_sequence_length=max_sequence_length,
                        generator=torch.Generator("cpu").manual_seed(seed),
                    ).images[0]
                    rel = f"{folder}/p{i:02d}-s{seed}.png"
                    if write:
                        path = output / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_suffix(".png.tmp")
                        image.save(tmp, format="PNG")
                        tmp.replace(path)
                    images.append(ValidationImage(i, prompt, seed, rel))
    finally:
        transformer.train(was_training)
    return images
