"""Palette tags: an image's dominant colours (k-means in CIELAB) named from a fixed colour vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# The fixed vocabulary: name -> sRGB anchor. Tags are `palette_<name>`; a colour takes the nearest anchor in Lab.
COLOR_VOCABULARY: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "silver": (192, 192, 192),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "maroon": (128, 0, 0),
    "orange": (255, 140, 0),
    "brown": (139, 69, 19),
    "beige": (245, 222, 179),
    "yellow": (255, 255, 0),
    "olive": (128, 128, 0),
    "lime": (0, 255, 0),
    "green": (0, 128, 0),
    "teal": (0, 128, 128),
    "cyan": (0, 255, 255),
    "sky_blue": (135, 206, 235),
    "blue": (0, 0, 255),
    "navy": (0, 0, 128),
    "purple": (128, 0, 128),
    "magenta": (255, 0, 255),
    "pink": (255, 182, 193),
}
TAG_PREFIX = "palette_"
MAX_SIDE = 64  # images are reduced to at most this many pixels a side before clustering
MAX_COLORS = 16

_XYZ_FROM_LINEAR_RGB = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255 (..., 3) -> CIELAB (D65) (..., 3), float64."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _XYZ_FROM_LINEAR_RGB.T / _D65_WHITE
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lightness, a, b], axis=-1)


_NAMES = tuple(COLOR_VOCABULARY)
_ANCHORS_LAB = rgb_to_lab(np.array([COLOR_VOCABULARY[n] for n in _NAMES]))


def color_name(lab: np.ndarray) -> str:
    """The vocabulary name nearest (CIE76 ΔE) to one Lab colour."""
    return _NAMES[int(np.argmin(((_ANCHORS_LAB - np.asarray(lab)) ** 2).sum(axis=1)))]


@dataclass(frozen=True)
class PaletteColor:
    name: str
    share: float  # fraction of the image's pixels
    hex: str  # the mean sRGB colour of those pixels

    @property
    def tag(self) -> str:
        return TAG_PREFIX + self.name


def _weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int, iterations: int = 20) -> np.ndarray:
    """Labels of a deterministic weighted k-means (k-means++ seeding with a fixed generator)."""
    rng = np.random.default_rng(0)
    centres = [points[int(np.argmax(weights))]]
    for _ in range(1, k):
        d2 = np.min(((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1) * weights
        if d2.sum() <= 0:
            break
        centres.append(points[int(rng.choice(len(points), p=d2 / d2.sum()))])
    centroids = np.array(centres)
    labels = np.zeros(len(points), dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmin(((points[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        moved = np.array(
            [
                np.average(points[labels == j], axis=0, weights=weights[labels == j])
                if np.any(labels == j)
                else centroids[j]
                for j in range(len(centroids))
            ]
        )
        if np.allclose(moved, centroids):
            break
        centroids = moved
    return labels


def palette(image: Image.Image, colors: int = 3) -> list[PaletteColor]:
    """Up to `colors` named dominant colours, largest share first; clusters with the same name merge."""
    if not 1 <= colors <= MAX_COLORS:
        raise ValueError(f"colors must be in 1..{MAX_COLORS}, got {colors}")
    img = image.convert("RGB")
    if max(img.size) > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(img, dtype=np.uint8).reshape(-1, 3)
    unique, counts = np.unique(pixels, axis=0, return_counts=True)
    weights = counts.astype(np.float64)
    lab = rgb_to_lab(unique)
    # Cluster into a few more groups than asked: small clusters of one hue merge by name afterwards.
    k = min(len(unique), colors + 2)
    labels = np.arange(len(unique)) if len(unique) <= k else _weighted_kmeans(lab, weights, k)
    total = weights.sum()
    named: dict[str, tuple[float, np.ndarray]] = {}
    for j in np.unique(labels):
        member = labels == j
        w = weights[member]
        centre_lab = np.average(lab[member], axis=0, weights=w)
        rgb_sum = (unique[member].astype(np.float64) * w[:, None]).sum(axis=0)
        name = color_name(centre_lab)
        share, acc = named.get(name, (0.0, np.zeros(3)))
        named[name] = (share + w.sum(), acc + rgb_sum)
    result = []
    for name, (weight, rgb_sum) in sorted(named.items(), key=lambda kv: (-kv[1][0], kv[0])):
        r, g, b = np.clip(np.rint(rgb_sum / weight), 0, 255).astype(int)
        result.append(PaletteColor(name, float(weight / total), f"#{r:02x}{g:02x}{b:02x}"))
    return result[:colors]
