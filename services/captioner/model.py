"""The captioner's VLM: the Auto classes real and tiny weights load through, `CaptionerModel` (load/ready/teardown
and batched greedy generation of many prompts per image, each image encoded once, on the shared `Model` base; knows
nothing of gRPC or prompts) and the tiny LLaVA builder that `ponyctl models tiny` uses."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
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
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pony_common.config import Settings
from pony_common.metrics import MODEL_INFO
from pony_common.models.clip import weights_version
from pony_common.models.dtypes import torch_dtype
from pony_common.models.lifecycle import Model
from pony_common.models.loading import model_load_lock
from pony_common.models.sources import require_model_source

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


@dataclass(frozen=True)
class PromptRow:
    """One prompt about one image of a batch: `image` indexes the batch's images; `max_new_tokens` is the row's own
    budget."""

    image: int
    prompt: str
    max_new_tokens: int


@dataclass
class GenerationCounts:
    """What the model has run since it was built: `generate` calls, prompt rows in them, and images that went through
    the vision tower (once per image when the architecture takes precomputed image features, else once per row)."""

    generate_calls: int = 0
    rows: int = 0
    images_encoded: int = 0


class RowBudgets(StoppingCriteria):
    """Stops each row of a batched `generate` at its own token budget; the batch runs until its largest budget."""

    def __init__(self, budgets: Sequence[int]) -> None:
        self.budgets = torch.tensor(list(budgets))
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1  # first called once the first new token is appended
        return (input_ids.shape[1] - self.start) >= self.budgets.to(input_ids.device)  # type: ignore[return-value]


class CaptionerModel(Model):
    """A transformers VLM loaded through the Auto classes, with batched greedy generation.

    `generate_rows` is one `model.generate` over many (image, prompt) rows. It takes no lock: callers run one batch at a
    time (the service's dynamic batcher merges concurrent requests into those batches).
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        template_version: str = "",
    ) -> None:
        super().__init__("captioner")
        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.template_version = template_version  # reported beside the weights in the model-info metric
        self._vlm: Any = None
        self._processor: Any = None
        self._version = ""
        self.counts = GenerationCounts()

    @classmethod
    def from_settings(cls, settings: Settings, *, template_version: str = "") -> CaptionerModel:
        """The VLM named by `PONY_CAPTIONER_MODEL` (or models_dir/vlm) on `PONY_DEVICE` in `PONY_DTYPE`."""
        return cls(
            settings.model_path("captioner"),
            device=settings.device,
            dtype=torch_dtype(settings.dtype),
            template_version=template_version,
        )

    # --- lifecycle ---

    def _load(self) -> None:
        model, processor = load_vlm(require_model_source(self.model_path, "captioner"), str(self.device), self.dtype)
        local = Path(self.model_path)
        revision = str(getattr(model.config, "_commit_hash", None) or "")
        self._version = weights_version(local) if local.is_dir() else revision[:12]
        self._processor = processor
        self._vlm = model
        logger.info("captioner ready", extra={"model": self.model_path, "model_version": self.model_version})
        MODEL_INFO.labels("captioner").info(
            {"model": self.model_id, "version": self.model_version, "template": self.template_version}
        )

    def _teardown(self) -> None:
        self._vlm = self._processor = None
        self._version = ""

    @property
    def model_id(self) -> str:
        return self.model_path

    @property
    def model_version(self) -> str:
        return self._version or "unknown"

    @property
    def vlm(self) -> Any:
        """The loaded transformers model (UNAVAILABLE before `load()`)."""
        return self.loaded(self._vlm)

    @property
    def processor(self) -> Any:
        """The loaded processor (UNAVAILABLE before `load()`)."""
        return self.loaded(self._processor)

    # --- generation ---

    def chat_prompt(self, prompt: str) -> str:
        """The chat-formatted prompt with one image slot, or the bare prompt for processors without a chat template
        (Florence-2 style task prompts)."""
        if getattr(self._processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Raw generated text for each (image, prompt), one batched `generate` call, greedy."""
        rows = [PromptRow(i, prompt, max_new_tokens) for i, prompt in enumerate(prompts)]
        return self.generate_rows(images, rows)

    def generate_rows(self, images: Sequence[Image.Image], rows: Sequence[PromptRow]) -> list[str]:
        """Raw generated text of each row: ONE greedy `generate` over all rows, padded left, each row stopped at its own
        budget. An image that several rows ask about goes through the vision tower once, its features passed to every
        row, where the architecture takes precomputed image features (`mm_encoder_outputs`: LLaVA and most VLMs of
        transformers 5); otherwise the tower runs once per row (`counts.images_encoded` tells which)."""
        self.require_ready()
        if not rows:
            return []
        texts = [self.chat_prompt(row.prompt) for row in rows]
        # The processor prepares each row's pixels (CPU); only the tower's forward is shared below.
        inputs = self._processor(
            images=[images[row.image] for row in rows], text=texts, return_tensors="pt", padding=True
        )
        inputs = {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        prompt_ids = inputs.get("input_ids")
        budgets = [max(1, int(row.max_new_tokens)) for row in rows]
        tokenizer = getattr(self._processor, "tokenizer", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        with torch.inference_mode():
            shared = self._shared_image_features(inputs, rows)
            extra = {} if shared is None else {"mm_encoder_outputs": shared}
            out = self._vlm.generate(
                **inputs,
                **extra,
                max_new_tokens=max(budgets),
                stopping_criteria=StoppingCriteriaList([RowBudgets(budgets)]),
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
        self.counts.generate_calls += 1
        self.counts.rows += len(rows)
        self.counts.images_encoded += len({row.image for row in rows}) if shared is not None else len(rows)
        n = 0 if prompt_ids is None else prompt_ids.shape[1]
        if n and out.shape[1] >= n and torch.equal(out[:, :n], prompt_ids):
            out = out[:, n:]  # decoder-only models return the prompt first; encoder-decoders do not
        return self._processor.batch_decode(
            [seq[:budget].tolist() for seq, budget in zip(out, budgets, strict=True)], skip_special_tokens=True
        )

    def _shared_image_features(self, inputs: dict[str, torch.Tensor], rows: Sequence[PromptRow]) -> dict | None:
        """`mm_encoder_outputs` for `generate`: each distinct image of `rows` through the vision tower once and its
        features given to every row about it; the image inputs are then taken out of `inputs`. None (and `inputs`
        untouched) when the architecture takes no precomputed features or its image inputs are not one entry per row
        (Qwen2-VL's flattened patches): `generate` then encodes each row's image itself."""
        vlm = self._vlm
        encode = getattr(vlm.base_model, "get_image_features", None)
        takes_features = getattr(vlm, "_supports_mm_encoder_outputs", None)
        if encode is None or takes_features is None or not takes_features():
            return None
        if "image" not in getattr(vlm, "input_modalities", ()):
            return None
        names = [name for name in inspect.signature(encode).parameters if name in inputs]
        if "pixel_values" not in names or any(inputs[name].shape[0] != len(rows) for name in names):
            return None
        first: dict[int, int] = {}  # image -> its first row
        for r, row in enumerate(rows):
            first.setdefault(row.image, r)
        pick = torch.tensor(list(first.values()), device=self.device)
        features = encode(**{name: inputs[name][pick] for name in names}, return_dict=True).pooler_output
        if len(features) != len(first):
            logger.warning("image features do not match the images; encoding per row")
            return None
        slot = {image: k for k, image in enumerate(first)}
        for name in names:
            del inputs[name]
        return {"image": BaseModelOutputWithPooling(pooler_output=[features[slot[row.image]] for row in rows])}
