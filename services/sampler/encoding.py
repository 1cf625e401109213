"""Image encoding off the event loop: PNG (with the generation parameters, `pnginfo.encode_png`) or WebP (lossless,
the A1111 text in EXIF UserComment as A1111 writes it) in a bounded pool of worker threads. PIL's zlib and libwebp
encoders release the GIL, so the threads encode in parallel and the event loop keeps serving while they do; the
pool's size is `PONY_SAMPLER_ENCODE_WORKERS` (0 = min(4, CPUs))."""

from __future__ import annotations

import asyncio
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from PIL import Image

from services.sampler.pnginfo import a1111_text, encode_png

Format = Literal["png", "webp"]
FORMATS: tuple[str, ...] = ("png", "webp")
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def encode_webp(image: Image.Image | np.ndarray, params: dict[str, Any]) -> bytes:
    """A lossless WebP of `image` carrying `params`: the A1111 text in EXIF UserComment (UNICODE, UTF-16BE, as A1111
    writes WebP/JPEG parameters) and the JSON in the ImageDescription tag."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    exif = Image.Exif()
    exif[0x010E] = json.dumps(params, sort_keys=True)  # ImageDescription
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + a1111_text(params).encode("utf-16-be")
    buf = io.BytesIO()
    image.save(buf, format="WEBP", lossless=True, exif=exif.tobytes())
    return buf.getvalue()


def encode_image(image: Image.Image | np.ndarray, params: dict[str, Any], fmt: Format = "png") -> bytes:
    """One image in `fmt` with its parameters (blocking)."""
    if fmt == "png":
        return encode_png(image, params)
    if fmt == "webp":
        return encode_webp(image, params)
    raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")


class ImageEncoder:
    """A bounded pool of encoder threads: `await encoder.encode(images, params)` encodes each image in a worker and
    returns their bytes in order; the event loop is never blocked by an encode."""

    def __init__(self, workers: int = 0) -> None:
        if workers < 0:
            raise ValueError(f"PONY_SAMPLER_ENCODE_WORKERS: must be >= 0 (0 = min(4, CPUs)), got {workers}")
        self.workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sampler-encode")

    async def encode(self, images: list[np.ndarray], params: list[dict[str, Any]], fmt: Format = "png") -> list[bytes]:
        if len(images) != len(params):
            raise ValueError(f"{len(images)} images but {len(params)} parameter sets")
        if fmt not in FORMATS:
            raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(self._pool, encode_image, image, p, fmt)
            for image, p in zip(images, params, strict=True)
        ]
        return list(await asyncio.gather(*futures))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
