"""Image encoding off the event loop (services/sampler/encoding.py): the pool's PNGs are the bytes `encode_png` makes
(parameters readable back), encoded in the pool's threads, never on the event loop's; WebP is lossless and carries
the A1111 text in EXIF UserComment; bad settings and formats are refused naming them."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from services.sampler import encoding
from services.sampler.encoding import ImageEncoder, encode_webp
from services.sampler.pnginfo import a1111_text, encode_png, read_parameters

PARAMS = [
    {"prompt": f"a pony {i}", "seed": i, "steps": 8, "guidance": 3.5, "width": 48, "height": 32} for i in range(3)
]


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in PARAMS]


def test_pngs_are_encoded_in_the_pool_not_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = encoding.encode_png

    def spy(image: Any, params: dict[str, Any]) -> bytes:
        threads.append(threading.current_thread().name)
        return real(image, params)

    monkeypatch.setattr(encoding, "encode_png", spy)
    encoder = ImageEncoder(workers=2)

    async def run() -> tuple[list[bytes], str]:
        return await encoder.encode(images(), PARAMS), threading.current_thread().name

    try:
        pngs, loop_thread = asyncio.run(run())
    finally:
        encoder.close()
    assert pngs == [encode_png(image, p) for image, p in zip(images(), PARAMS, strict=True)]
    assert len(threads) == 3 and all(t.startswith("sampler-encode") for t in threads) and loop_thread not in threads
    for png, image, p in zip(pngs, images(), PARAMS, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
        assert read_parameters(png)["seed"] == p["seed"]


def test_webp_is_lossless_and_carries_the_parameters() -> None:
    image = images()[0]
    encoder = ImageEncoder(workers=1)
    try:
        (webp,) = asyncio.run(encoder.encode([image], PARAMS[:1], fmt="webp"))
    finally:
        encoder.close()
    assert webp == encode_webp(image, PARAMS[0])
    with Image.open(io.BytesIO(webp)) as img:
        assert img.format == "WEBP"
        assert np.array_equal(np.asarray(img.convert("RGB")), image)
        comment = img.getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\0" + a1111_text(PARAMS[0]).encode("utf-16-be")


def test_bad_settings_and_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="PONY_SAMPLER_ENCODE_WORKERS"):
        ImageEncoder(workers=-1)
    assert ImageEncoder(workers=0).workers >= 1
    encoder = ImageEncoder(workers=1)
    try:
        with pytest.raises(ValueError, match="format"):
            asyncio.run(encoder.encode(images()[:1], PARAMS[:1], fmt="gif"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="parameter sets"):
            asyncio.run(encoder.encode(images(), PARAMS[:1]))
    finally:
        encoder.close()
