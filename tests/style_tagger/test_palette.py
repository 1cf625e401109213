"""Palette tags: dominant colours by k-means in Lab, named from the fixed vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from services.style_tagger.palette import COLOR_VOCABULARY, color_name, palette, rgb_to_lab


@pytest.mark.parametrize("name", sorted(COLOR_VOCABULARY))
def test_a_solid_image_of_each_vocabulary_colour_gets_its_name(name: str) -> None:
    colors = palette(Image.new("RGB", (48, 32), COLOR_VOCABULARY[name]))
    assert [(c.name, c.tag, c.share) for c in colors] == [(name, f"palette_{name}", 1.0)]
    r, g, b = COLOR_VOCABULARY[name]
    assert colors[0].hex == f"#{r:02x}{g:02x}{b:02x}"


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((250, 12, 8), "red"),
        ((10, 120, 135), "teal"),
        ((20, 20, 140), "navy"),
        ((255, 150, 20), "orange"),
        ((250, 250, 250), "white"),
        ((12, 10, 14), "black"),
        ((110, 60, 25), "brown"),
        ((250, 185, 200), "pink"),
    ],
)
def test_near_colours_take_the_nearest_name(rgb: tuple[int, int, int], name: str) -> None:
    assert palette(Image.new("RGB", (16, 16), rgb))[0].name == name


def test_shares_follow_areas_and_noise_does_not_invent_colours() -> None:
    arr = np.zeros((60, 60, 3), dtype=np.uint8)
    arr[:, :45] = (0, 128, 128)  # three quarters teal
    arr[:, 45:] = (255, 255, 0)  # one quarter yellow
    noisy = np.clip(arr + np.random.default_rng(0).normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
    colors = palette(Image.fromarray(noisy), colors=3)
    assert [c.name for c in colors] == ["teal", "yellow"]
    assert colors[0].share == pytest.approx(0.75, abs=0.03)
    assert colors[1].share == pytest.approx(0.25, abs=0.03)


def test_colours_are_capped_and_ordered_by_share() -> None:
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:20] = (255, 0, 0)
    arr[20:30] = (0, 0, 255)
    arr[30:36] = (0, 128, 0)
    arr[36:] = (255, 255, 255)
    colors = palette(Image.fromarray(arr), colors=2)
    assert [c.name for c in colors] == ["red", "blue"]
    assert [c.name for c in palette(Image.fromarray(arr), colors=4)] == ["red", "blue", "green", "white"]


def test_lab_conversion_matches_reference_values() -> None:
    assert rgb_to_lab(np.array([255, 255, 255])) == pytest.approx([100.0, 0.0, 0.0], abs=0.01)
    assert rgb_to_lab(np.array([255, 0, 0])) == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    assert color_name(rgb_to_lab(np.array([0, 0, 250]))) == "blue"


def test_colors_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="colors"):
        palette(Image.new("RGB", (4, 4)), colors=0)
