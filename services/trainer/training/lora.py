"""LoRA (peft) on the AuraFlow transformer as diffusers' LoRA training scripts add it, and its weights in the file
layout `AuraFlowPipeline.load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AuraFlowPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from services.trainer.spec import LORA_WEIGHTS, LoraSpec

__all__ = ["LORA_WEIGHTS", "add_lora", "lora_state_dict", "save_lora"]


def add_lora(transformer: nn.Module, spec: LoraSpec, seed: int) -> None:
    """Freezes the transformer and adds a trainable LoRA on `spec.targets` (B initialised to zero, so the model's
    output is unchanged until it trains; A drawn from `seed`, so a run is reproducible on every rank)."""
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights=True,
        target_modules=list(spec.targets),
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable LoRA weights stay fp32 (master copies)


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(folder: Path, transformer: nn.Module) -> Path:
    """Writes `<folder>/pytorch_lora_weights.safetensors` (diffusers' transformer LoRA layout); returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    AuraFlowPipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(transformer))
    return folder / LORA_WEIGHTS
