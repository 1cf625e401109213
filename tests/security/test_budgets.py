"""Request budgets: a request whose images declare more pixels (or bytes) than the budget is refused, naming the field
and the setting, before any pixel is decoded, at every service that reads images; the scorer's memory stays flat
through such a request. The sampler refuses an over-long prompt before tokenizing, and validates off the event loop.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pony.v1 import (
    captioner_pb2,
    captioner_pb2_grpc,
    common_pb2,
    safety_pb2,
    safety_pb2_grpc,
    sampler_pb2,
    sampler_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    style_tagger_pb2,
    style_tagger_pb2_grpc,
)
from pony_common.budgets import OpenedImage, RequestBudget, load_images, open_images
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.grpc.client import channel
from pony_common.imagerefs import ImageResolver
from pony_common.testing import serve
from tests.conftest import free_port
from tests.sampler_stack import SamplerStack
from tests.samples import SERVING, bomb_png, png_bytes, readiness

SIDE = 7999  # 63,984,001 pixels: just under the per-image cap (PONY_MAX_IMAGE_PIXELS, 64 Mpx)
HUGE = 8  # images per request: 512 Mpx in all, four times the default request budget (128 Mpx)
RGB_BYTES = SIDE * SIDE * 3  # one of them decoded: 192 MB
GROWTH_BOUND = 150 * 2**20  # less than one of them decoded


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(side: int = SIDE) -> bytes:
    """A valid side x side PNG of black pixels at one bit per pixel: about 8 KB on the wire, 192 MB decoded to RGB."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = (b"\x00" * (1 + (side + 7) // 8)) * side
    idat = zlib.compress(rows, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def huge() -> bytes:
    return huge_png()


def refs(*blobs: bytes) -> list[common_pb2.ImageRef]:
    return [common_pb2.ImageRef(data=b) for b in blobs]


def expect_over_budget(call: Any, field: str, setting: str = "PONY_REQUEST_MAX_PIXELS") -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details()
    assert details.startswith(f"{field}:") and setting in details, details
    return details


# --- the budget itself ---


def test_pixels_are_summed_from_headers_per_group_and_bad_images_stay_item_errors(settings: Settings) -> None:
    resolver = ImageResolver(settings)
    small = png_bytes((10, 20, 30), (80, 80))  # 6,400 pixels
    budget = RequestBudget(max_items=10, max_pixels=10_000, max_bytes=2**20)
    named = [(f"images[{i}]", ref) for i, ref in enumerate(refs(small, bomb_png(), small))]

    with pytest.raises(InvalidArgument) as caught:
        open_images(resolver, named, budget, "images")
    assert caught.value.field == "images" and "12,800 pixels" in caught.value.message

    # Decoded one at a time (a stream's batches of 1), each fits; the bomb is its own item's error, uncounted.
    opened = open_images(resolver, named, budget, "images", group=1)
    assert [type(x) for x in opened] == [OpenedImage, InvalidArgument, OpenedImage]
    assert opened[1].field == "images[1]" and opened[0].probe.tile  # headers only: its tiles are still to decode
    loaded = load_images(resolver, named[:1], budget, "images")
    assert loaded[0].image.size == (80, 80)


def test_the_bytes_read_are_budgeted(settings: Settings) -> None:
    resolver = ImageResolver(settings)
    image = png_bytes((0, 0, 0), (64, 64), noise_seed=3)
    budget = RequestBudget(max_items=10, max_pixels=10**9, max_bytes=2 * len(image) + 10)
    named = [(f"images[{i}]", ref) for i, ref in enumerate(refs(*[image] * 3))]
    with pytest.raises(InvalidArgument) as caught:
        open_images(resolver, named, budget, "images")
    assert caught.value.field == "images" and "PONY_REQUEST_MAX_IMAGE_BYTES" in caught.value.message
    assert len(open_images(resolver, named[:2], budget, "images")) == 2
    with pytest.raises(InvalidArgument) as caught:
        budget.check_items(11, "images")
    assert caught.value.field == "images" and "at most 10" in caught.value.message


# --- the scorer, in its own process: its memory through an over-budget request ---


def _memory_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak(pid: int) -> int:
    """Resets the process's peak RSS to its current RSS (Linux >= 4.0) and returns the baseline in bytes; where the
    kernel refuses, the peak so far is the baseline."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        pass
    return _memory_kb(pid)["VmHWM"] * 1024


@pytest.fixture
def scorer_process(model_settings: Settings, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, grpc.Channel]]:
    """`ponyctl serve scorer` on a free loopback port, ready; stopped whatever happens."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PONY_")}
    environ.update(model_settings.replace(bind_host="127.0.0.1", log_json=False).to_env())
    log = (tmp_path / "scorer.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pony_common.cli.main", "serve", "scorer", "--port", str(port)],
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, (tmp_path / "scorer.log").read_text(errors="replace")[-3000:]
                try:
                    if readiness(channel) == SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the scorer did not become ready"
                time.sleep(0.2)
            yield proc, channel
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


def test_the_scorer_refuses_huge_images_before_spending_memory_and_keeps_serving(scorer_process, huge) -> None:
    proc, channel = scorer_process
    stub = scorer_pb2_grpc.ScorerStub(channel)
    small = refs(png_bytes((200, 30, 30)), png_bytes((0, 0, 0), noise_seed=1))
    assert len(stub.Score(scorer_pb2.ScoreRequest(images=small), timeout=60).results) == 2  # warm: lazy set-up done

    request = scorer_pb2.ScoreRequest(images=refs(*[huge] * HUGE))
    assert request.ByteSize() < 200_000  # small on the wire, 1.5 GB once decoded
    baseline = _reset_peak(proc.pid)
    details = expect_over_budget(lambda: stub.Score(request, timeout=120), "images")
    growth = _memory_kb(proc.pid)["VmHWM"] * 1024 - baseline
    assert f"{HUGE} images declare {HUGE * SIDE * SIDE:,} pixels" in details
    assert growth < GROWTH_BOUND, f"peak RSS grew by {growth / 2**20:.0f} MiB; one decoded image is {RGB_BYTES >> 20}"

    assert readiness(channel) == SERVING
    reply = stub.Score(scorer_pb2.ScoreRequest(images=small), timeout=60)
    assert [r.HasField("error") for r in reply.results] == [False, False]


def test_the_scorer_budgets_image_bytes_too(model_settings: Settings) -> None:
    image = png_bytes((0, 0, 0), (64, 64), noise_seed=5)
    settings = model_settings.replace(request_max_image_bytes=2 * len(image))
    from services.scorer.app import create_service

    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        request = scorer_pb2.EmbedRequest(images=refs(image, image, image))
        expect_over_budget(lambda: stub.Embed(request, timeout=60), "images", "PONY_REQUEST_MAX_IMAGE_BYTES")
        assert len(stub.Embed(scorer_pb2.EmbedRequest(images=refs(image, image)), timeout=60).results) == 2


# --- the same budget at the captioner, the style tagger and safety ---


def test_the_captioner_refuses_huge_images_per_call_and_per_stream(model_settings: Settings, huge) -> None:
    from services.captioner.app import create_service

    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = captioner_pb2_grpc.CaptionerStub(ch)
        items = [captioner_pb2.CaptionItem(image=ref) for ref in refs(*[huge] * HUGE)]
        expect_over_budget(lambda: stub.Caption(captioner_pb2.CaptionRequest(items=items), timeout=120), "items")
        stream = captioner_pb2.CaptionStreamRequest(items=items)
        expect_over_budget(lambda: list(stub.CaptionStream(stream, timeout=120)), "items")
        assert readiness(ch) == SERVING
        small = captioner_pb2.CaptionItem(image=refs(png_bytes((1, 2, 3)))[0], kinds=[captioner_pb2.CAPTION_KIND_SHORT])
        reply = stub.Caption(captioner_pb2.CaptionRequest(items=[small], max_new_tokens=8), timeout=120)
        assert not reply.results[0].HasField("error")


def test_the_style_tagger_refuses_huge_images(model_settings: Settings, huge) -> None:
    from services.style_tagger.app import create_service

    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = style_tagger_pb2_grpc.StyleTaggerStub(ch)
        request = style_tagger_pb2.StyleTaggerEmbedRequest(images=refs(*[huge] * HUGE))
        expect_over_budget(lambda: stub.Embed(request, timeout=120), "images")
        palette = style_tagger_pb2.PaletteRequest(images=refs(*[huge] * HUGE))
        expect_over_budget(lambda: stub.Palette(palette, timeout=120), "images")
        assert readiness(ch) == SERVING
        ok = stub.Embed(style_tagger_pb2.StyleTaggerEmbedRequest(images=refs(png_bytes((9, 9, 9)))), timeout=60)
        assert not ok.results[0].HasField("error") and ok.results[0].embedding


def test_safety_refuses_huge_images(model_settings: Settings, huge) -> None:
    from services.safety.app import create_service

    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = safety_pb2_grpc.SafetyStub(ch)
        items = [safety_pb2.SafetyItem(item_id=f"i{i}", image=ref) for i, ref in enumerate(refs(*[huge] * HUGE))]
        expect_over_budget(lambda: stub.Check(safety_pb2.CheckRequest(items=items), timeout=120), "items")
        assert readiness(ch) == SERVING
        one = safety_pb2.SafetyItem(item_id="ok", image=refs(png_bytes((9, 9, 9)))[0])
        reply = stub.Check(safety_pb2.CheckRequest(items=[one]), timeout=60)
        assert not reply.results[0].HasField("error") and reply.results[0].image_id


# --- the sampler: prompt length before tokenizing, validation off the event loop ---


class GatedTokenizer:
    """The real tokenizer behind a gate: it notes that validation has reached it, then waits for the test to open
    the gate, so the test knows the validation is running while it calls the health service."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_max_length = inner.model_max_length
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self.gate.wait(120):
            raise TimeoutError("the test never opened the gate")
        return self.inner(*args, **kwargs)


@pytest.mark.triton
def test_a_30_mb_prompt_is_refused_naming_the_field_before_tokenizing(sampler_stack: SamplerStack) -> None:
    with sampler_stack.channel() as channel:
        stub = sampler_pb2_grpc.SamplerStub(channel)
        huge_prompt = "a pony in a field " * (30 * 2**20 // 18)
        for field, request in (
            ("prompt", sampler_pb2.GenerateRequest(prompt=huge_prompt)),
            ("negative_prompt", sampler_pb2.GenerateRequest(prompt="a pony", negative_prompt=huge_prompt)),
        ):
            details = expect_over_budget(lambda r=request: stub.Generate(r, timeout=60), field, "MAX_PROMPT_CHARS")
            assert f"{len(huge_prompt):,} characters" in details
        assert readiness(channel) == SERVING


@pytest.mark.triton
def test_health_is_answered_while_a_long_prompt_is_being_validated(sampler_stack: SamplerStack) -> None:
    from services.sampler.model import SamplerModel

    settings = sampler_stack.settings.replace(triton_start=False, triton_url=sampler_stack.model.url)
    model = SamplerModel(settings)
    model.load()  # before the service builds its validator over model.tokenizer
    tokenizer = GatedTokenizer(model.tokenizer)
    model.tokenizers[model.default] = tokenizer  # the default family's (the service's validator reads this table)
    try:
        server = sampler_stack.start_sampler(settings, model=model)
    except BaseException:
        model.teardown()
        raise
    target = f"127.0.0.1:{server.port}"
    try:
        with channel(sampler_stack.settings, target) as sampler, grpc.insecure_channel(target) as plain:
            stub = sampler_pb2_grpc.SamplerStub(sampler)
            prompt = "a pony in a field " * 400  # 7,200 characters: within the length cap, over the token limit
            call = stub.Generate.future(sampler_pb2.GenerateRequest(prompt=prompt, steps=1), timeout=180)
            assert tokenizer.entered.wait(120), "the validation never reached the tokenizer"
            # The validation is held inside the tokenizer now; the server answers all the same.
            health = health_pb2_grpc.HealthStub(plain)
            answer = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=30)
            assert answer.status == SERVING
            assert not call.done()
            tokenizer.gate.set()
            with pytest.raises(grpc.RpcError) as err:
                call.result()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("prompt:") and "tokens" in err.value.details()
    finally:
        tokenizer.gate.set()
        sampler_stack.stop_server(server)
