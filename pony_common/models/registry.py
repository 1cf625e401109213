"""Which model each service loads: a Hugging Face id or local path from config, else its folder in models_dir."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pony_common.config import Settings

# Folder names under PONY_MODELS_DIR, as written by `ponyctl models tiny`.
MODEL_DIRS = {
    "captioner": "vlm",
    "scorer": "clip",
    "style_tagger": "clip",
    "safety": "clip",
    "sampler": "auraflow",
    "trainer": "auraflow",
}
HEAD_DIRS = {"scorer": "heads/aesthetic", "safety": "heads/nsfw"}


def model_path(settings: Settings, service: str) -> str:
    """`PONY_<SERVICE>_MODEL` when set, else `<models_dir>/<folder>`."""
    key = service.replace("-", "_")
    if key not in MODEL_DIRS:
        raise KeyError(f"no model registered for service {service!r}")
    explicit = getattr(settings, f"{key}_model", "")
    return explicit or str(Path(settings.models_dir) / MODEL_DIRS[key])


def head_path(settings: Settings, service: str) -> str:
    """`PONY_<SERVICE>_HEAD` when set, else `<models_dir>/heads/<name>`."""
    key = service.replace("-", "_")
    explicit = getattr(settings, f"{key}_head", "")
    return explicit or str(Path(settings.models_dir) / HEAD_DIRS[key])
