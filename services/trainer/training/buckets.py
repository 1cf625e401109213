"""Aspect-ratio buckets of about one pixel area per stage, and the resize + centre crop of an image into its bucket."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}"


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[Bucket]:
    """Buckets with sides multiple of `step`, area <= resolution², aspect within 1/max_aspect..max_aspect.

    For each width the tallest height that fits the area is taken, so every bucket is close to the area.
    """
    area = resolution * resolution
    buckets = {Bucket(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            buckets.add(Bucket(width, height))
        width += step
    return sorted(buckets, key=lambda b: (b.aspect, b.width))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest (in log space) to the image's; ties go to the larger area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} has no pixels")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.width * b.height))


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resizes so the image covers the bucket, then crops the centre."""
    scale = max(bucket.width / image.width, bucket.height / image.height)
    w = max(bucket.width, round(image.width * scale))
    h = max(bucket.height, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    left = (w - bucket.width) // 2
    top = (h - bucket.height) // 2
    return resized.crop((left, top, left + bucket.width, top + bucket.height))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A (3, H, W) float tensor in [-1, 1], what the VAE encoder expects."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
