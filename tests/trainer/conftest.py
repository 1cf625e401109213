"""Trainer test fixtures: a tiny manifest in the export format, made from generated images, and tiny specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from pony_common.access import export_root
from pony_common.config import Settings
from pony_common.images import image_id
from services.trainer.training.manifest import ManifestItem, write_manifest

# (width, height, colour a, colour b): solid colours and gradients, square and not.
IMAGES = [
    (64, 64, (220, 40, 40), (220, 40, 40)),
    (64, 64, (30, 30, 200), (240, 240, 60)),
    (96, 64, (20, 160, 60), (20, 160, 60)),
    (64, 96, (250, 250, 250), (10, 10, 10)),
]


def make_manifest(folder: Path) -> Path:
    """Writes four PNGs and `manifest.parquet` describing them (captions, special tags, tags, V7 prompt)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (w, h, a, b) in enumerate(IMAGES):
        ramp = np.linspace(0.0, 1.0, w)[None, :, None]
        arr = np.array(a, dtype=np.float32) + (np.array(b, dtype=np.float32) - np.array(a)) * ramp
        arr = np.broadcast_to(arr, (h, w, 3)).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(np.ascontiguousarray(arr), "RGB").save(path)
        data = path.read_bytes()
        colour = ["red", "blue", "green", "white"][i]
        special = [f"score_{9 - i}", "style_cluster_1", "source_pony", "rating_safe"]
        captions = {
            "short": f"a {colour} square",
            "medium": f"a {colour} square with a soft gradient",
            "long": f"a plain {colour} square that fades gently from one side to the other",
            "style": "flat digital art with smooth shading",
        }
        tags = [colour, "gradient", "simple background"]
        items.append(
            ManifestItem(
                image_id=image_id(data),
                image_uri=path.name,  # relative to the manifest's folder
                width=w,
                height=h,
                captions=captions,
                special_tags=tuple(special),
                tags=tuple(tags),
                prompt=", ".join([*special, captions["medium"], captions["style"], *tags]),
            )
        )
    return write_manifest(folder / "manifest.parquet", items)


@pytest.fixture
def manifest(settings: Settings) -> Path:
    """Where the trainer may read it: under <state_dir>/export of the test's settings (a training root)."""
    return make_manifest(Path(export_root(settings)) / "data")


def tiny_spec(manifest: Path, **overrides: Any) -> dict[str, Any]:
    """A spec document for a few CPU steps on the tiny model: 32 px then 64 px stages."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "manifest": str(manifest),
        "seed": 3,
        "max_sequence_length": 16,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "autocast_on_cpu": False,
        "stages": [
            {"name": "low", "resolution": 32, "steps": 3, "batch_size": 2, "bucket_step": 16},
            {"name": "high", "resolution": 64, "steps": 3, "batch_size": 2, "bucket_step": 16},
        ],
        "optimizer": {"learning_rate": 1e-3},
        "checkpoint": {"every": 3, "keep": 3},
        "ema": {"enabled": True, "decay": 0.9},
    }
    spec.update(overrides)
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
