"""Perceptual hash (DCT pHash, 64 bits) of an image and the Hamming distance between two hashes."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of size n x n."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0, :] = np.sqrt(1.0 / n)
    return m


def phash(image: Image.Image) -> str:
    """64-bit pHash as 16 hex digits: greyscale 32x32, 2-D DCT, the 8x8 lowest frequencies against their median.

    Re-encoding, resizing and small colour changes move few bits; different images differ in about half."""
    n = HASH_SIZE * HIGHFREQ_FACTOR
    pixels = np.asarray(image.convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = _dct_matrix(n)
    low = (dct @ pixels @ dct.T)[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
