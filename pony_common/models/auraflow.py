"""The V7 model (diffusers AuraFlowPipeline): loading, and its components at tiny or full size."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import UMT5Config, UMT5EncoderModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pony_common.models.loading import load_diffusers_pipeline, model_load_lock

SCHEDULER_SHIFT = 1.73
# Text tokens the pipeline encodes (its max_sequence_length) and the tokenizer's model_max_length.
MAX_SEQUENCE_LENGTH = 256
T5_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}

# Full size: AuraFlow v0.3 / Pony V7 shapes (as in the diffusers anchor benchmark).
_FULL = {
    "transformer": {"pos_embed_max_size": 9216},
    "text_encoder": {
        "vocab_size": 32128,
        "d_model": 2048,
        "d_kv": 64,
        "d_ff": 5120,
        "num_layers": 24,
        "num_heads": 32,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
    },
}
# Tiny: same classes and depth structure (4 VAE levels: 8x downsampling; patch 2), small widths.
# transformer.sample_size 8 -> the pipeline's default image is 64x64; pos_embed_max_size 9216 = 96x96
# patches, like the real model, so up to 1536 px per side works.
_TINY = {
    "transformer": {
        "sample_size": 8,
        "num_mmdit_layers": 1,
        "num_single_dit_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "caption_projection_dim": 16,
        "pos_embed_max_size": 9216,
    },
    "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    "vae": {
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    },
}


def build_auraflow_components(
    tokenizer: PreTrainedTokenizerBase,
    *,
    size: Literal["tiny", "full"] = "tiny",
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Randomly initialised (seeded) AuraFlowPipeline components: `AuraFlowPipeline(**components)`.

    `size="full"` builds the real shapes (about 6.8B + 3B parameters) directly on `device` in `dtype`.
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    shapes = _TINY if size == "tiny" else _FULL
    te_shapes = dict(shapes["text_encoder"])
    te_shapes.setdefault("vocab_size", len(tokenizer))
    if te_shapes["vocab_size"] < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, text encoder only {te_shapes['vocab_size']}")
    text_config = UMT5Config(
        **te_shapes,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        scalable_attention=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    vae_shapes = shapes["vae"]
    levels = len(vae_shapes["block_out_channels"])
    dev = torch.device(device)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    previous_dtype = torch.get_default_dtype()
    with model_load_lock, torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with dev:
                transformer = AuraFlowTransformer2DModel(**shapes["transformer"])
                text_encoder = UMT5EncoderModel(text_config)
                vae = AutoencoderKL(
                    down_block_types=["DownEncoderBlock2D"] * levels,
                    up_block_types=["UpDecoderBlock2D"] * levels,
                    latent_channels=4,
                    scaling_factor=0.13025,
                    force_upcast=False,
                    **vae_shapes,
                )
        finally:
            torch.set_default_dtype(previous_dtype)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "vae": vae.eval(),
        "transformer": transformer.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
    }


def load_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> AuraFlowPipeline:
    """`AuraFlowPipeline.from_pretrained` (a local folder or a hub id) on `device`, progress bar off."""
    return load_diffusers_pipeline(AuraFlowPipeline, path, device, dtype)
