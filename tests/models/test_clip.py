"""The shared CLIP image tower and the tiny CLIP's real-class loading."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPModel, CLIPProcessor

from pony_common.models.clip import TINY_CLIP_PROJECTION_DIM, ClipImageTower


def _images() -> list[Image.Image]:
    return [
        Image.new("RGB", (64, 48), "red"),
        Image.new("L", (30, 90), 200),
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)),
    ]


def test_tiny_clip_loads_like_openai_clip(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["clip"]
    model = CLIPModel.from_pretrained(path)
    processor = CLIPProcessor.from_pretrained(path)
    assert type(AutoModel.from_pretrained(path)) is CLIPModel
    assert type(AutoProcessor.from_pretrained(path)) is CLIPProcessor
    assert model.config.projection_dim == TINY_CLIP_PROJECTION_DIM
    inputs = processor(
        text=["a pony in a meadow", "a red dragon"], images=_images()[:2], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (2, 2)
    tokens = processor.tokenizer.tokenize("a pony in a meadow")
    assert tokens == ["a</w>", "pony</w>", "in</w>", "a</w>", "meadow</w>"]
    assert processor.tokenizer.decode(processor.tokenizer("a red pony")["input_ids"], skip_special_tokens=True) == (
        "a red pony"
    )


def test_embeddings_are_l2_normalised_float32(tiny_dirs: dict[str, Path]) -> None:
    tower = ClipImageTower(str(tiny_dirs["clip"]))
    assert not tower.ready
    emb = tower.embed(_images())
    assert tower.ready
    assert emb.dtype == torch.float32 and emb.shape == (3, TINY_CLIP_PROJECTION_DIM) == (3, tower.dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1])
    assert tower.embed([]).shape == (0, tower.dim)


def test_embeddings_match_clipmodel_image_features(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["clip"]
    model = CLIPModel.from_pretrained(path).eval()
    pixels = CLIPProcessor.from_pretrained(path)(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    tower = ClipImageTower(str(path))
    assert torch.allclose(tower.embed(_images(), batch_size=2), expected, atol=1e-5)


def test_shared_returns_one_tower_per_weights_device_dtype(tiny_dirs: dict[str, Path]) -> None:
    path = str(tiny_dirs["clip"])
    first = ClipImageTower.shared(path)
    assert ClipImageTower.shared(path, "cpu", torch.float32) is first
    assert ClipImageTower.shared(path, dtype=torch.bfloat16) is not first
    towers: list[ClipImageTower] = []
    threads = [threading.Thread(target=lambda: towers.append(ClipImageTower.shared(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(t is first for t in towers)


def test_concurrent_first_use_loads_once(tiny_dirs: dict[str, Path]) -> None:
    tower = ClipImageTower(str(tiny_dirs["clip"]))
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(tower.embed(_images()[:1]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(torch.equal(r, results[0]) for r in results)


def test_version_is_a_stable_short_hash_of_the_weights(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from services.stack.tiny import build_tiny_models

    a = ClipImageTower(str(tiny_dirs["clip"])).version
    assert len(a) == 12 and a == ClipImageTower(str(tiny_dirs["clip"])).version
    other = build_tiny_models(tmp_path, seed=5)
    assert ClipImageTower(str(other["clip"])).version != a
