"""The V6 model (diffusers StableDiffusionXLPipeline): loading, and its components at tiny size.

The tiny model keeps SDXL's structure: two CLIP text encoders (`CLIPTextModel` and `CLIPTextModelWithProjection`,
their penultimate hidden states concatenated as the UNet's cross-attention context), a `UNet2DConditionModel`
with `addition_embed_type="text_time"` (the pooled text embedding and the six size/crop time ids), a 4-level
`AutoencoderKL` (8x downsampling, 4 latent channels) and SDXL's `EulerDiscreteScheduler` configuration
(scaled-linear betas 0.00085..0.012, `leading` timestep spacing, epsilon prediction)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pony_common.models.loading import load_diffusers_pipeline, model_load_lock

# Text tokens one CLIP chunk holds (start and end tokens included): SDXL's tokenizers' model_max_length.
MAX_SEQUENCE_LENGTH = 77
# SDXL's scheduler (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json, as an Euler sampler).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
_TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 time ids is embedded in this many features
_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
_PROJECTION_DIM = 32
# sample_size 8 latents -> the pipeline's default image is 64x64.
_UNET = {
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "sample_size": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 1),
    "norm_num_groups": 8,
    "use_linear_projection": True,
}
_VAE = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64}


def _text_config(tokenizer: PreTrainedTokenizerBase) -> CLIPTextConfig:
    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_SEQUENCE_LENGTH,
        projection_dim=_PROJECTION_DIM,
        hidden_act="gelu",
        bos_token_id=vocab[tokenizer.bos_token],
        eos_token_id=vocab[tokenizer.eos_token],
        pad_token_id=vocab[tokenizer.pad_token],
        **_TEXT,
    )


def build_sdxl_components(
    tokenizer: PreTrainedTokenizerBase, tokenizer_2: PreTrainedTokenizerBase, *, seed: int = 0
) -> dict[str, Any]:
    """Randomly initialised (seeded) tiny StableDiffusionXLPipeline components:
    `StableDiffusionXLPipeline(**components)`."""
    context_dim = 2 * _TEXT["hidden_size"]  # both encoders' hidden states, concatenated
    with model_load_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            cross_attention_dim=context_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + _PROJECTION_DIM,
            **_UNET,
        )
        levels = len(_VAE["block_out_channels"])
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            latent_channels=4,
            scaling_factor=0.13025,
            force_upcast=False,
            **_VAE,
        )
    return {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet.eval(),
        "scheduler": EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def load_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """`StableDiffusionXLPipeline.from_pretrained` (a local folder or a hub id) on `device`, progress bar off."""
    return load_diffusers_pipeline(StableDiffusionXLPipeline, path, device, dtype)
