"""Captioner throughput (captions/s) with batched generation against plain `model.generate` on the same model.

Builds a LLaVA-1.5-layout VLM of the chosen size with random weights (CLIP vision tower + Llama decoder, the
tiny word-level tokenizer), saves it, loads it through `CaptionerService` (the service's code path), and times
`caption()` of one kind against `model.generate` on the same prompts, batch and token budget (the baseline,
as in /work/shared/ref/bench/vlm_caption_anchor.py). The ratio is what prompting, pre/post-processing and
clean-up cost on top of generation.

    .venv/bin/python bench/captioner_throughput.py --size tiny          # CPU smoke run
    .venv/bin/python bench/captioner_throughput.py --size 7b            # ~7B decoder (GPU, bf16)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pony_common.models.dtypes import torch_dtype
from services.captioner.model import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, TINY_VLM_SPECIAL_TOKENS, CaptionerModel
from services.captioner.prompts import KIND_SPECS
from services.captioner.service import CaptionerService, CaptionJob
from services.stack.tiny import vlm_tokenizer

# (vision: image side, patch, width, layers, heads) (text: width, ffn, layers, heads, kv heads)
SIZES = {
    "tiny": ((32, 8, 32, 2, 2), (64, 128, 2, 4, 2)),
    "1b": ((336, 14, 1024, 24, 16), (2048, 5632, 22, 32, 4)),
    "7b": ((336, 14, 1024, 24, 16), (4096, 11008, 32, 32, 32)),
}


def build_vlm(out: Path, size: str, dtype: torch.dtype) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    (side, patch, vw, vl, vh), (tw, tf, tl, th, tkv) = SIZES[size]
    tokenizer = vlm_tokenizer()
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in TINY_VLM_SPECIAL_TOKENS.items()}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=side, patch_size=patch, hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
            num_attention_heads=vh, projection_dim=768,
        ),
        text_config=LlamaConfig(
            vocab_size=32064 if size != "tiny" else len(tokenizer), hidden_size=tw, intermediate_size=tf,
            num_hidden_layers=tl, num_attention_heads=th, num_key_value_heads=tkv, max_position_embeddings=4096,
            bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(side // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=ids["pad_token"],
    )  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"]
    )
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)


def images(count: int, side: int = 448) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").resize((side, side), Image.BICUBIC)
        for _ in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--kind", choices=sorted(KIND_SPECS), default="medium")
    parser.add_argument("--new-tokens", type=int, default=0, help="token budget (default: the kind's own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = torch_dtype(dtype_name)
    tokens = args.new_tokens or KIND_SPECS[args.kind].max_new_tokens
    batches = [int(b) for b in args.batch_sizes.split(",")]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        build_vlm(Path(tmp) / "vlm", args.size, dtype)
        captioner = CaptionerService(
            CaptionerModel(str(Path(tmp) / "vlm"), device=args.device, dtype=dtype),
            batch_size=max(batches),
            max_new_tokens=tokens,
        )
        captioner.model.load()
        model, processor = captioner.model.vlm, captioner.model.processor
        params = sum(p.numel() for p in model.parameters()) / 1e9
        print(f"captioner: LLaVA-layout {args.size} ({params:.2f}B params) on {args.device} ({dtype_name}), "
              f"kind {args.kind}, {tokens} new tokens, greedy")  # fmt: skip
        print(f"{'batch':>5}  {'ours cap/s':>10}  {'generate cap/s':>14}  {'ours/generate':>13}")
        for batch in batches:
            pics = images(batch)
            jobs = [CaptionJob(p, tags=["pony", "blue_sky"], characters=["Twilight Sparkle"], kinds=[args.kind])
                    for p in pics]  # fmt: skip
            prompts = [captioner.prompts.prompt(args.kind, ["pony", "blue_sky"], ["Twilight Sparkle"])] * batch
            texts = [captioner.model.chat_prompt(p) for p in prompts]

            def plain(pics: list = pics, texts: list = texts) -> None:
                inputs = processor(images=pics, text=texts, return_tensors="pt", padding=True).to(args.device)
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                with torch.inference_mode():
                    model.generate(**inputs, max_new_tokens=tokens, do_sample=False, num_beams=1)

            def ours(jobs: list = jobs) -> None:
                outcomes = captioner.caption(jobs, max_new_tokens=tokens)
                assert all(o.ok for o in outcomes)

            timings = {}
            for name, fn in (("plain", plain), ("ours", ours)):
                fn()  # warm-up
                best = float("inf")
                for _ in range(2):
                    sync()
                    started = time.perf_counter()
                    fn()
                    sync()
                    best = min(best, time.perf_counter() - started)
                timings[name] = batch / best
            print(f"{batch:>5}  {timings['ours']:>10.2f}  {timings['plain']:>14.2f}  "
                  f"{timings['ours'] / timings['plain']:>13.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
