"""The tiny model factory: layout, byte-identical rebuilds, configs free of build-time paths."""

from __future__ import annotations

import json
from pathlib import Path

from services.stack.tiny import TINY_MODEL_DIRS, build_tiny_models


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_the_save_pretrained_layout(tiny_dirs: dict[str, Path]) -> None:
    assert tuple(tiny_dirs) == TINY_MODEL_DIRS
    root = tiny_dirs["clip"].parent
    assert {str(p.relative_to(root)) for p in tiny_dirs.values()} == set(TINY_MODEL_DIRS)
    expected = {
        "clip": ["config.json", "model.safetensors", "processor_config.json", "tokenizer.json"],
        "vlm": ["config.json", "model.safetensors", "processor_config.json", "tokenizer.json"],
        "auraflow": [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ],
        "heads/aesthetic": ["head.json", "head.safetensors"],
        "heads/nsfw": ["head.json", "head.safetensors"],
    }
    for name, files in expected.items():
        for file in files:
            assert (tiny_dirs[name] / file).is_file(), f"{name}/{file}"
    assert json.loads((tiny_dirs["clip"] / "config.json").read_text())["architectures"] == ["CLIPModel"]
    assert json.loads((tiny_dirs["vlm"] / "config.json").read_text())["model_type"] == "llava"
    assert json.loads((tiny_dirs["auraflow"] / "model_index.json").read_text())["_class_name"] == "AuraFlowPipeline"


def test_building_twice_gives_byte_identical_files(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    first_root = tiny_dirs["clip"].parent
    second_root = tmp_path / "again"
    build_tiny_models(second_root, seed=0)
    first, second = _files(first_root), _files(second_root)
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []


def test_another_seed_gives_other_weights(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    other = build_tiny_models(tmp_path / "seed1", seed=1)
    assert (other["clip"] / "model.safetensors").read_bytes() != (tiny_dirs["clip"] / "model.safetensors").read_bytes()
    assert (other["clip"] / "tokenizer.json").read_bytes() == (tiny_dirs["clip"] / "tokenizer.json").read_bytes()


def test_rebuilding_into_the_same_folder_replaces_it(tmp_path: Path) -> None:
    build_tiny_models(tmp_path, seed=0)
    stale = tmp_path / "clip" / "stale.bin"
    stale.write_bytes(b"old")
    (tmp_path / "unrelated.txt").write_text("kept")
    build_tiny_models(tmp_path, seed=0)
    assert not stale.exists()
    assert (tmp_path / "unrelated.txt").read_text() == "kept"


def test_written_configs_do_not_name_the_build_folder(tiny_dirs: dict[str, Path]) -> None:
    root = tiny_dirs["clip"].parent
    for path in root.rglob("*.json"):
        text = path.read_text()
        assert str(root) not in text, path
        assert "/tmp" not in text, path
        data = json.loads(text)
        assert data.get("_name_or_path", "") == "", path
