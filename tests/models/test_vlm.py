"""The tiny VLM loads through the Auto classes like real VLM weights and captions a padded batch."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from services.captioner.model import VLM_MODEL_CLASS, VLM_PROCESSOR_CLASS, load_vlm
from services.stack.tiny import ENGLISH_WORDS


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def test_auto_classes_load_the_llava_model(tiny_dirs: dict[str, Path]) -> None:
    processor = VLM_PROCESSOR_CLASS.from_pretrained(tiny_dirs["vlm"])
    model = VLM_MODEL_CLASS.from_pretrained(tiny_dirs["vlm"])
    assert isinstance(processor, LlavaProcessor)
    assert isinstance(model, LlavaForConditionalGeneration)
    prompt = processor.apply_chat_template(_messages("describe the image"), add_generation_prompt=True)
    assert prompt == "USER: <image>\ndescribe the image ASSISTANT:"


def test_generates_decodable_words_for_a_padded_batch(tiny_dirs: dict[str, Path]) -> None:
    model, processor = load_vlm(str(tiny_dirs["vlm"]))
    images = [Image.new("RGB", (120, 80), "red"), Image.new("RGB", (48, 96), "blue")]
    prompts = ["describe the image", "describe the pony in this picture in great detail , please"]
    text = [processor.apply_chat_template(_messages(p), add_generation_prompt=True) for p in prompts]
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"]
    assert mask[0].sum() < mask[1].sum() and mask[0, 0] == 0  # left padding of the shorter prompt
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and new.shape[1] > 0
    captions = processor.batch_decode(new, skip_special_tokens=True)
    vocabulary = set(ENGLISH_WORDS) | {".", ",", ":", ";", "!", "?", "'", '"', "(", ")", "-"}
    for caption in captions:
        words = caption.split()
        assert words, captions
        assert set(words) <= vocabulary, caption


def test_batch_rows_do_not_depend_on_padding(tiny_dirs: dict[str, Path]) -> None:
    model, processor = load_vlm(str(tiny_dirs["vlm"]))
    image = Image.new("RGB", (64, 64), "green")
    short = processor.apply_chat_template(_messages("a pony"), add_generation_prompt=True)
    long = processor.apply_chat_template(_messages("a pony in a meadow with many flowers"), add_generation_prompt=True)
    with torch.inference_mode():
        alone = processor(images=[image], text=[short], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)[:, alone["input_ids"].shape[1] :]
        both = processor(images=[image, image], text=[short, long], return_tensors="pt", padding=True)
        batch = model.generate(**both, max_new_tokens=6, do_sample=False)[:, both["input_ids"].shape[1] :]
    assert (
        processor.batch_decode(single, skip_special_tokens=True)[0]
        == processor.batch_decode(batch, skip_special_tokens=True)[0]
    )
