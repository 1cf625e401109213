"""The local engine at batch: all kinds of a batch of images in ONE `generate` with each image through the vision tower
once, greedy texts equal to the per-kind and one-row-at-a-time paths, a bad image failing alone, and concurrent gRPC
calls merged into model batches with each caller's results intact."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY

from pony.v1 import captioner_pb2, captioner_pb2_grpc, common_pb2
from pony_common.config import Settings
from pony_common.testing import serve
from services.captioner.app import create_service
from services.captioner.model import CaptionerModel, PromptRow
from services.captioner.prompts import KINDS, PromptBook
from services.captioner.service import CaptionerService, CaptionJob
from services.captioner.servicer import KIND_OF_ENUM
from tests.samples import png_bytes

# Small, different budgets per kind: each row must stop at its own.
BUDGETS = {"short": 5, "medium": 9, "long": 13, "style": 7}


def noise(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes((0, 0, 0), size=(48, 40), noise_seed=seed))).convert("RGB")


@pytest.fixture(scope="module")
def model(tiny_models: Path) -> Iterator[CaptionerModel]:
    vlm = CaptionerModel(str(tiny_models / "vlm"))
    vlm.load()
    yield vlm
    vlm.teardown()


def plain_generate(
    model: CaptionerModel, images: Sequence[Image.Image], prompts: Sequence[str], budget: int
) -> list[str]:
    """Today's per-kind call, straight through transformers: the processor's pixels into `generate`, one budget."""
    processor = model.processor
    inputs = processor(
        images=list(images), text=[model.chat_prompt(p) for p in prompts], return_tensors="pt", padding=True
    )
    with torch.inference_mode():
        out = model.vlm.generate(
            **inputs, max_new_tokens=budget, do_sample=False, num_beams=1, pad_token_id=processor.tokenizer.pad_token_id
        )
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class TowerCount:
    """Images through the vision tower's forward, counted by a forward hook for the `with` block."""

    def __init__(self, model: CaptionerModel) -> None:
        self.tower = model.vlm.base_model.vision_tower
        self.calls: list[int] = []

    def __enter__(self) -> TowerCount:
        self.handle = self.tower.register_forward_hook(lambda _m, args, _out: self.calls.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def test_all_kinds_of_a_batch_are_one_generate_each_image_encoded_once_and_equal_to_the_per_kind_path(
    model: CaptionerModel,
) -> None:
    book = PromptBook.load()
    images = [noise(seed) for seed in range(3)]
    prompt = {kind: book.prompt(kind, ["pony", "blue_sky"], ["twilight_sparkle"]) for kind in KINDS}
    rows = [PromptRow(i, prompt[kind], BUDGETS[kind]) for i in range(len(images)) for kind in KINDS]
    before = (model.counts.generate_calls, model.counts.images_encoded)

    with TowerCount(model) as tower:
        texts = model.generate_rows(images, rows)

    assert (model.counts.generate_calls, model.counts.images_encoded) == (before[0] + 1, before[1] + 3)
    assert tower.calls == [3]  # one tower forward over the 3 images, not 12 rows
    per_kind = {kind: plain_generate(model, images, [prompt[kind]] * 3, BUDGETS[kind]) for kind in KINDS}
    assert texts == [per_kind[kind][i] for i in range(3) for kind in KINDS]
    alone = [plain_generate(model, [images[row.image]], [row.prompt], row.max_new_tokens)[0] for row in rows[:4]]
    assert texts[:4] == alone
    tokenizer = model.processor.tokenizer
    for row, text in zip(rows, texts, strict=True):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= row.max_new_tokens + 2


def test_the_service_captions_a_batch_as_it_captions_each_image_alone_and_a_bad_image_fails_alone(
    model: CaptionerModel,
) -> None:
    jobs = [
        CaptionJob(noise(10), tags=["pony", "artist:somebody"], characters=["rainbow_dash"]),
        CaptionJob(Image.new("RGB", (0, 0))),  # the processor cannot resize it: generation fails for this image
        CaptionJob(noise(11), kinds=["short", "style"]),
        CaptionJob(noise(12), kinds=["long"], characters=["Spike"]),
    ]
    batched = CaptionerService(model, batch_size=8)
    one_by_one = CaptionerService(model, batch_size=1)
    calls = model.counts.generate_calls

    outcomes = batched.caption(jobs, max_new_tokens=10)

    assert model.counts.generate_calls - calls == 3  # the batch of 4 failed before `generate`; then image by image
    alone = [one_by_one.caption([job], max_new_tokens=10)[0] for job in jobs]
    assert outcomes[1].error_reason == "internal" and "ZeroDivisionError" in outcomes[1].error_message
    assert not outcomes[1].captions and alone[1].error_reason == "internal"
    for i in (0, 2, 3):
        assert outcomes[i].ok, outcomes[i].error_message
        assert [(c.kind, c.text) for c in outcomes[i].captions] == [(c.kind, c.text) for c in alone[i].captions]
    assert [c.kind for c in outcomes[0].captions] == list(KINDS)
    assert all("Rainbow Dash" in c.text for c in outcomes[0].captions[:3])
    assert [c.kind for c in outcomes[2].captions] == ["short", "style"]


# --- concurrent gRPC callers share model batches ---

CALLERS = 6


def batch_metrics() -> tuple[float, float, float]:
    """(model batches run, batches of one image, requests merged) so far for the captioner's batcher."""

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "captioner", **labels}) or 0.0

    return (
        value("pony_model_batch_size_count"),
        value("pony_model_batch_size_bucket", le="1.0"),
        value("pony_model_requests_merged_total"),
    )


def request(k: int) -> captioner_pb2.CaptionRequest:
    k_ = captioner_pb2
    kinds = [[], [k_.CAPTION_KIND_SHORT], [k_.CAPTION_KIND_LONG, k_.CAPTION_KIND_STYLE]]
    return captioner_pb2.CaptionRequest(
        items=[
            captioner_pb2.CaptionItem(
                item_id=f"r{k}",
                image=common_pb2.ImageRef(data=png_bytes((0, 0, 0), noise_seed=100 + k)),
                tags=["pony", f"tag_{k}"],
                characters=["twilight_sparkle"] if k % 2 else [],
                kinds=kinds[k % 3],
            )
        ],
        max_new_tokens=8,
    )


def test_concurrent_calls_are_merged_into_model_batches_with_each_callers_results_intact(
    tiny_models: Path, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {},
        state_dir=str(tmp_path / "state"),
        models_dir=str(tiny_models),
        captioner_batch_size=CALLERS,  # a batch starts as soon as every caller's image is in ...
        captioner_batch_delay_ms=5000,  # ... or long after the first arrived, however slow the machine is
    )
    requests = [request(k) for k in range(CALLERS)]
    reference = CaptionerService.from_settings(settings.replace(captioner_batch_size=1))
    reference.model.load()
    expected = []
    for r in requests:
        item = r.items[0]
        job = CaptionJob(
            Image.open(io.BytesIO(item.image.data)).convert("RGB"),
            tags=list(item.tags),
            characters=list(item.characters),
            kinds=[KIND_OF_ENUM[k] for k in item.kinds],
        )
        expected.append([c.text for c in reference.caption([job], r.max_new_tokens)[0].captions])
    reference.close()

    definition = create_service(settings)
    with serve(settings, definition) as served, grpc.insecure_channel(served.address) as channel:
        stub = captioner_pb2_grpc.CaptionerStub(channel)
        start = threading.Barrier(CALLERS)
        batches, singles, merged = batch_metrics()  # the server runs in this process: its metrics are ours

        def call(r: captioner_pb2.CaptionRequest) -> captioner_pb2.CaptionResponse:
            start.wait(timeout=60)
            return stub.Caption(r, timeout=300)

        with ThreadPoolExecutor(CALLERS) as pool:
            replies = list(pool.map(call, requests))

        after = batch_metrics()
    ran, ran_single, merged_requests = after[0] - batches, after[1] - singles, after[2] - merged
    assert ran_single < ran, f"no model batch held more than one image ({ran} batches)"
    assert merged_requests >= 2
    for r, reply, texts in zip(requests, replies, expected, strict=True):
        (result,) = reply.results
        assert result.item_id == r.items[0].item_id and not result.HasField("error")
        assert [c.text for c in result.captions] == texts
