"""The captioner's VLM: the Auto classes real and tiny weights load through, and the tiny LLaVA builder."""

from __future__ import annotations

import logging

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pony_common.models.loading import model_load_lock

logger = logging.getLogger(__name__)

# Florence-2, Qwen2.5-VL, InternVL, LLaVA ... all load through these two (no trust_remote_code).
VLM_MODEL_CLASS = AutoModelForImageTextToText
VLM_PROCESSOR_CLASS = AutoProcessor

IMAGE_TOKEN = "<image>"
TINY_VLM_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TINY_VLM_IMAGE_SIZE = 32
TINY_VLM_PATCH_SIZE = 8
TINY_VLM_MAX_LENGTH = 4096

# llava-hf/llava-1.5 chat template: images first, then text; "USER: <image>\n... ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_vlm(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A small LLaVA-1.5 (CLIP ViT 32 px / patch 8 -> 16 image tokens, 2-layer Llama) and its processor.

    `tokenizer` must know `IMAGE_TOKEN` and `TINY_VLM_SPECIAL_TOKENS`; the model's vocabulary is its length.
    """
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in TINY_VLM_SPECIAL_TOKENS.items()}
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id == ids["unk_token"]:
        raise ValueError(f"the tiny VLM tokenizer lacks {IMAGE_TOKEN}")
    num_patches = (TINY_VLM_IMAGE_SIZE // TINY_VLM_PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=TINY_VLM_IMAGE_SIZE,
            patch_size=TINY_VLM_PATCH_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_VLM_MAX_LENGTH,
            bos_token_id=ids["bos_token"],
            eos_token_id=ids["eos_token"],
            pad_token_id=ids["pad_token"],
        ),
        image_token_index=image_token_id,
        image_seq_length=num_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=ids["pad_token"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"]
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_VLM_IMAGE_SIZE},
        crop_size={"height": TINY_VLM_IMAGE_SIZE, "width": TINY_VLM_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_VLM_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def load_vlm(
    path: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Model + processor through the Auto classes, in eval mode, tokenizer padding on the left.

    Decoder-only VLMs need left padding for batched `generate`; the real checkpoints ship right padding.
    """
    logger.info("loading VLM %s on %s (%s)", path, device, dtype)
    with model_load_lock:
        processor = VLM_PROCESSOR_CLASS.from_pretrained(path)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        model = VLM_MODEL_CLASS.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, processor
