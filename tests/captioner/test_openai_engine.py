"""The captioner's OpenAI engine against a real OpenAI-compatible server: `transformers serve` (the installed
transformers) with the tiny VLM on CPU, offline. Captions come back cleaned and equal to the local engine's, bad images
are item errors, and a server that is down makes the call UNAVAILABLE."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2
import pytest
from PIL import Image

from pony.v1 import captioner_pb2, captioner_pb2_grpc, common_pb2
from pony_common.config import ConfigError, Settings
from pony_common.testing import serve
from services.captioner.app import create_service
from services.captioner.openai_engine import OpenAIEngine
from services.captioner.service import CaptionerService, CaptionJob
from services.captioner.servicer import KIND_OF_ENUM
from tests.conftest import free_port
from tests.samples import RANDOM_BYTES, SERVING, png_bytes, readiness

K = captioner_pb2
TOKENS = 8
READY_TIMEOUT_S = 300  # the server imports torch and transformers, then loads the model: slow on a busy 2-core box


@pytest.fixture(scope="module")
def openai_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve` pinned to the tiny VLM on a free port; its API root. Stopped whatever happens."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(tiny_models / "vlm")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(log.parent / "hf")}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready in {READY_TIMEOUT_S} s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def openai_settings(tiny_models: Path, state: Path, base_url: str, **overrides: object) -> Settings:
    key = state / "api-key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("sk-test-not-checked-by-transformers-serve\n", encoding="utf-8")
    return Settings.from_env(
        {},
        state_dir=str(state),
        models_dir=str(tiny_models),
        captioner_engine="openai",
        captioner_openai_base_url=base_url,
        captioner_openai_api_key_file=str(key),
        captioner_openai_concurrency=4,
        captioner_openai_timeout_s=120.0,
        **overrides,
    )


def item(data: bytes, **kw: object) -> captioner_pb2.CaptionItem:
    return captioner_pb2.CaptionItem(image=common_pb2.ImageRef(data=data), **kw)


def test_captions_through_the_server_are_cleaned_and_equal_the_local_engines(
    openai_server: str, tiny_models: Path, tmp_path: Path
) -> None:
    settings = openai_settings(tiny_models, tmp_path / "state", openai_server)
    items = [
        item(png_bytes((0, 0, 0), noise_seed=7), item_id="a", tags=["pony", "artist:nobody"], characters=["spike"]),
        item(b"", item_id="empty"),
        item(png_bytes((200, 40, 40)), item_id="b", kinds=[K.CAPTION_KIND_SHORT, K.CAPTION_KIND_STYLE]),
        item(RANDOM_BYTES, item_id="noise"),
    ]
    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as channel:
        stub = captioner_pb2_grpc.CaptionerStub(channel)
        reply = stub.Caption(captioner_pb2.CaptionRequest(items=items, max_new_tokens=TOKENS), timeout=300)
        a, empty, b, noise = reply.results
        for bad, index in ((empty, 1), (noise, 3)):
            assert bad.error.reason == "invalid_image" and bad.error.field == f"items[{index}].image"
            assert not bad.captions
        assert readiness(channel) == SERVING

    local = CaptionerService.from_settings(settings.replace(captioner_engine="transformers"))
    local.model.load()
    for result, sent in ((a, items[0]), (b, items[2])):
        assert not result.HasField("error") and result.captions
        job = CaptionJob(
            Image.open(io.BytesIO(sent.image.data)).convert("RGB"),
            tags=list(sent.tags),
            characters=list(sent.characters),
            kinds=[KIND_OF_ENUM[k] for k in sent.kinds],
        )
        (expected,) = local.caption([job], TOKENS)
        got = [(KIND_OF_ENUM[c.kind], c.text) for c in result.captions]
        assert got == [(c.kind, c.text) for c in expected.captions]
        for caption in result.captions:
            assert caption.text == " ".join(caption.text.split())
            assert caption.provenance.model == str(tiny_models / "vlm")
            assert caption.provenance.model_version == local.engine.model_version
    local.close()
    assert [KIND_OF_ENUM[c.kind] for c in b.captions] == ["short", "style"]
    assert all("Spike" in c.text for c in a.captions[:3]) and "Spike" not in a.captions[3].text
    assert all("nobody" not in c.text.lower() for c in a.captions)


def test_an_image_the_engine_cannot_send_fails_alone(openai_server: str, tiny_models: Path, tmp_path: Path) -> None:
    service = CaptionerService.from_settings(openai_settings(tiny_models, tmp_path / "state", openai_server))
    service.model.load()
    try:
        good = Image.open(io.BytesIO(png_bytes((9, 9, 9), noise_seed=3))).convert("RGB")
        empty, ok = service.caption([CaptionJob(Image.new("RGB", (0, 0))), CaptionJob(good, kinds=["short"])], TOKENS)
    finally:
        service.close()
    assert empty.error_reason == "internal" and "ValueError" in empty.error_message and not empty.captions
    assert ok.ok and [c.kind for c in ok.captions] == ["short"] and ok.captions[0].text


def test_a_request_the_server_refuses_is_an_item_error_not_unavailable(
    openai_server: str, tiny_models: Path, tmp_path: Path
) -> None:
    settings = openai_settings(tiny_models, tmp_path / "state", openai_server, captioner_openai_model="not-served")
    service = CaptionerService.from_settings(settings)
    service.model.load()
    try:
        good = Image.open(io.BytesIO(png_bytes((9, 9, 9), noise_seed=4))).convert("RGB")
        (refused,) = service.caption([CaptionJob(good, kinds=["short"])], TOKENS)  # the server answers HTTP 400
    finally:
        service.close()
    assert refused.error_reason == "internal" and "CaptionServerError" in refused.error_message


def test_a_server_that_is_down_makes_the_call_unavailable_and_the_captioner_keeps_serving(
    tiny_models: Path, tmp_path: Path
) -> None:
    settings = openai_settings(tiny_models, tmp_path / "state", f"http://127.0.0.1:{free_port()}/v1")
    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as channel:
        stub = captioner_pb2_grpc.CaptionerStub(channel)
        items = [item(png_bytes((1, 2, 3)), item_id="x"), item(b"", item_id="bad")]
        with pytest.raises(grpc.RpcError) as err:
            stub.Caption(captioner_pb2.CaptionRequest(items=items, max_new_tokens=TOKENS), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot be reached" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.CaptionStream(captioner_pb2.CaptionStreamRequest(items=items), timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert readiness(channel) == SERVING


def test_engine_settings_are_checked(tiny_models: Path, tmp_path: Path) -> None:
    base = Settings.from_env({}, state_dir=str(tmp_path / "state"), models_dir=str(tiny_models))
    with pytest.raises(ConfigError, match="PONY_CAPTIONER_ENGINE='vllm' is not an engine"):
        CaptionerService.from_settings(base.replace(captioner_engine="vllm"))
    with pytest.raises(ConfigError, match="needs PONY_CAPTIONER_OPENAI_BASE_URL"):
        CaptionerService.from_settings(base.replace(captioner_engine="openai"))
    missing = str(tmp_path / "no-such-key")
    engine = OpenAIEngine.from_settings(
        base.replace(captioner_openai_base_url="http://127.0.0.1:9/v1", captioner_openai_api_key_file=missing)
    )
    with pytest.raises(ConfigError, match=r"PONY_CAPTIONER_OPENAI_API_KEY_FILE=.*cannot read it"):
        engine.load()
    assert not engine.ready
