"""Captioner: all kinds of a batch in one `generate` with each image encoded once, and concurrent callers merged into
model batches, against today's path (one `generate` per kind, the vision tower re-run for every kind; callers served
one at a time at batch 1), on the same LLaVA-layout model, images and token budgets. One run prints both side by side.

    .venv/bin/python bench/captioner_kinds.py                     # CPU smoke run (tiny model, 32-token cap)
    .venv/bin/python bench/captioner_kinds.py --size 7b --new-tokens 0 --images 64 --callers 64   # GPU, bf16
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner_throughput import SIZES, build_vlm, images

from pony_common.models.dtypes import torch_dtype
from services.captioner.model import CaptionerModel, PromptRow
from services.captioner.prompts import KIND_SPECS, KINDS
from services.captioner.service import CaptionerService, CaptionJob

TAGS, CHARACTERS = ["pony", "blue_sky"], ["Twilight Sparkle"]


class Tally:
    """`generate` calls and images through the vision tower while a block runs (forward hooks)."""

    def __init__(self, model: CaptionerModel) -> None:
        self.vlm = model.vlm
        self.generates = 0
        self.tower_images = 0

    def __enter__(self) -> Tally:
        tower = self.vlm.base_model.vision_tower
        self.hooks = [tower.register_forward_hook(self._tower)]
        self._generate = self.vlm.generate

        def counted(*args: object, **kwargs: object) -> object:
            self.generates += 1
            return self._generate(*args, **kwargs)

        self.vlm.generate = counted
        return self

    def _tower(self, _module: object, args: tuple, _out: object) -> None:
        self.tower_images += args[0].shape[0]

    def __exit__(self, *exc: object) -> None:
        for hook in self.hooks:
            hook.remove()
        del self.vlm.generate


def timed(fn: Callable[[], object], sync: Callable[[], None], model: CaptionerModel) -> tuple[float, Tally]:
    fn()  # warm-up
    sync()
    with Tally(model) as tally:
        started = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - started, tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--images", type=int, default=16, help="images in the one-batch comparison")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers of one image each")
    parser.add_argument("--new-tokens", type=int, default=32, help="cap on every kind's budget (0: the kinds' own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = torch_dtype(dtype_name)
    cap = args.new_tokens or max(spec.max_new_tokens for spec in KIND_SPECS.values())
    budget = {kind: min(spec.max_new_tokens, cap) for kind, spec in KIND_SPECS.items()}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        build_vlm(Path(tmp) / "vlm", args.size, dtype)
        model = CaptionerModel(str(Path(tmp) / "vlm"), device=args.device, dtype=dtype)
        service = CaptionerService(model, batch_size=args.callers, batch_delay_ms=50, max_new_tokens=cap)
        model.load()
        prompt = {kind: service.prompts.prompt(kind, TAGS, CHARACTERS) for kind in KINDS}
        params = sum(p.numel() for p in model.vlm.parameters()) / 1e9
        print(f"captioner: LLaVA-layout {args.size} ({params:.2f}B params) on {args.device} ({dtype_name}), "
              f"4 kinds, budgets {budget}, greedy")  # fmt: skip

        # 1. One batch of N images x 4 kinds.
        pics = images(args.images)

        def per_kind() -> None:  # today: one generate per kind, each re-encoding every image
            for kind in KINDS:
                model.generate(pics, [prompt[kind]] * len(pics), budget[kind])

        rows = [PromptRow(i, prompt[kind], budget[kind]) for i in range(len(pics)) for kind in KINDS]

        def all_kinds() -> None:  # ours: one generate, each image encoded once
            model.generate_rows(pics, rows)

        # `model.generate` shares features only between rows of one image; per kind each image has one row, so the
        # baseline encodes every image once per kind, as today's path did.
        base_s, base = timed(per_kind, sync, model)
        ours_s, ours = timed(all_kinds, sync, model)
        captions = 4 * len(pics)
        print(f"\n1. one batch of {len(pics)} images x 4 kinds ({captions} captions)")
        print(f"{'':>26}{'captions/s':>12}{'generate calls':>16}{'tower images':>14}")
        print(f"{'today (one call per kind)':>26}{captions / base_s:>12.2f}{base.generates:>16}{base.tower_images:>14}")
        print(f"{'ours (one call, shared)':>26}{captions / ours_s:>12.2f}{ours.generates:>16}{ours.tower_images:>14}")
        print(f"{'ours / today':>26}{base_s / ours_s:>12.2f}")

        # 2. C concurrent callers, one image each, all kinds.
        callers = images(args.callers)
        jobs = [CaptionJob(p, tags=TAGS, characters=CHARACTERS) for p in callers]

        def serial() -> None:  # today: a global lock; each caller's kinds one generate each, batch 1
            for pic in callers:
                for kind in KINDS:
                    model.generate([pic], [prompt[kind]], budget[kind])

        def merged() -> None:  # ours: the dynamic batcher merges the callers' images into model batches
            async def run() -> None:
                outcomes = await asyncio.gather(*(service.caption_async([job], cap) for job in jobs))
                assert all(o[0].ok for o in outcomes)

            asyncio.run(run())

        base_s, base = timed(serial, sync, model)
        ours_s, ours = timed(merged, sync, model)
        service.close()
        n = len(callers)
        print(f"\n2. {n} concurrent callers, one image each, 4 kinds")
        print(f"{'':>26}{'images/s':>12}{'generate calls':>16}{'tower images':>14}")
        print(f"{'today (serial, batch 1)':>26}{n / base_s:>12.2f}{base.generates:>16}{base.tower_images:>14}")
        print(f"{'ours (merged batches)':>26}{n / ours_s:>12.2f}{ours.generates:>16}{ours.tower_images:>14}")
        print(f"{'ours / today':>26}{base_s / ours_s:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
