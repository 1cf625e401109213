"""Ready dataloader configs written beside a training export, for the trainers people use on the same folder:
SimpleTuner's `multidatabackend.json` (a local backend, captions from the `.txt` sidecars) and a kohya sd-scripts
`dataset.toml` (the same sidecars, `caption_extension = ".txt"`). Paths are absolute: the configs are rewritten by
each export, and both trainers resolve relative paths against their working directory, not the config's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SIMPLETUNER_FILE = "multidatabackend.json"
KOHYA_FILE = "dataset.toml"
DEFAULT_RESOLUTION = 1024


def simpletuner_backends(export_dir: Path, resolution: int = DEFAULT_RESOLUTION) -> list[dict[str, Any]]:
    """SimpleTuner's data backends: the images with their `.txt` captions, and the text-embed cache it requires."""
    root = export_dir.absolute()
    return [
        {
            "id": "pony-export",
            "type": "local",
            "instance_data_dir": str(root / "images"),
            "caption_strategy": "textfile",
            "resolution": resolution,
            "resolution_type": "pixel_area",
            "minimum_image_size": resolution // 2,
            "crop": False,
            "repeats": 0,
            "metadata_backend": "discovery",
            "cache_dir_vae": str(root / "cache" / "vae"),
        },
        {
            "id": "pony-text-embeds",
            "dataset_type": "text_embeds",
            "default": True,
            "type": "local",
            "cache_dir": str(root / "cache" / "text"),
        },
    ]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def kohya_dataset_toml(export_dir: Path, resolution: int = DEFAULT_RESOLUTION) -> str:
    """kohya sd-scripts' dataset config: one subset of the export's images, captions from the `.txt` sidecars,
    aspect-ratio buckets, captions not shuffled (the special tags stay first)."""
    general = {
        "caption_extension": ".txt",
        "shuffle_caption": False,
        "keep_tokens": 0,
        "enable_bucket": True,
        "bucket_no_upscale": True,
    }
    dataset = {"resolution": resolution, "batch_size": 1}
    subset = {"image_dir": str(export_dir.absolute() / "images"), "num_repeats": 1}
    lines = ["[general]", *(f"{k} = {_toml_value(v)}" for k, v in general.items()), ""]
    lines += ["[[datasets]]", *(f"{k} = {_toml_value(v)}" for k, v in dataset.items()), ""]
    lines += ["  [[datasets.subsets]]", *(f"  {k} = {_toml_value(v)}" for k, v in subset.items()), ""]
    return "\n".join(lines)


def dataloader_files(export_dir: Path, resolution: int = DEFAULT_RESOLUTION) -> dict[str, bytes]:
    """File name -> contents of every config written beside the export."""
    return {
        SIMPLETUNER_FILE: (json.dumps(simpletuner_backends(export_dir, resolution), indent=2) + "\n").encode(),
        KOHYA_FILE: kohya_dataset_toml(export_dir, resolution).encode(),
    }
