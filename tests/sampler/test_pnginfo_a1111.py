"""PNG parameters as A1111 writes them, read back by another tool (sd-parsers, from PyPI): prompt, negative prompt,
seed, steps, sampler (`Euler`, `Schedule type: Simple`), `Model hash` and `Lora hashes`; and how the model hash is
computed (A1111's short sha256 of a checkpoint file, of every weights file of a diffusers folder), once per folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sd_parsers import ParserManager

from services.sampler.generation import GenerationSpec
from services.sampler.lora import AdapterSpec
from services.sampler.pnginfo import ModelHashes, a1111_text, encode_png, parse_a1111, read_parameters, weights_sha256

ADAPTERS = (
    AdapterSpec("style-a", 2, "/x", "a" * 64, 0.75, lora_hash="0123456789ab"),
    AdapterSpec("style.b_2", 1, "/y", "b" * 64, 1.0, lora_hash="ba9876543210"),
)


def spec(**changes: object) -> GenerationSpec:
    values: dict = dict(
        prompt="score_9, a pony, smiling: happy",
        user_prompt="a pony, smiling: happy",
        negative_prompt="blurry, lowres",
        width=64,
        height=48,
        steps=4,
        guidance=3.5,
        seed=11,
        num_images=1,
        adapters=ADAPTERS,
    )
    values.update(changes)
    return GenerationSpec(**values)


def sd_parsers_read(png: bytes):
    return ParserManager().parse(Image.open(io.BytesIO(png)))


def test_sd_parsers_reads_prompt_seed_steps_model_hash_and_lora_hashes() -> None:
    params = spec().parameters(11, "3", "0123abcdef")
    png = encode_png(np.zeros((48, 64, 3), np.uint8), params)
    info = sd_parsers_read(png)
    assert info is not None and info.generator.value == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert [p.value for p in sampler.prompts] == ["score_9, a pony, smiling: happy"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, lowres"]
    assert sampler.name == "Euler"  # A1111's name for our flow-matching Euler
    assert sampler.parameters["seed"] == "11" and sampler.parameters["steps"] == "4"
    assert sampler.parameters["scheduler"] == "Simple" and sampler.parameters["cfg_scale"] == "3.5"
    assert (sampler.model.name, sampler.model.hash) == ("pony_v7", "0123abcdef")
    assert info.metadata["Hashes"] == {
        "model": "0123abcdef",
        "lora:style-a": "0123456789ab",
        "lora:style.b_2": "ba9876543210",
    }
    text = read_parameters(png)["parameters"]
    assert 'Lora hashes: "style-a: 0123456789ab, style.b_2: ba9876543210"' in text  # as A1111 writes it
    assert "Model hash: 0123abcdef, Model: pony_v7" in text


def test_our_reader_reads_the_a1111_text_back() -> None:
    params = spec().parameters(11, "3", "0123abcdef")
    back = parse_a1111(a1111_text(params))
    assert back["lora_hashes"] == {"style-a": "0123456789ab", "style.b_2": "ba9876543210"}
    assert (back["model_hash"], back["seed"], back["sampler"]) == ("0123abcdef", 11, "Euler (flow matching)")
    assert back["hashes"]["lora:style-a"] == "0123456789ab"
    pony = read_parameters(encode_png(np.zeros((4, 4, 3), np.uint8), params))
    assert pony["adapters"] == [
        {"name": "style-a", "version": 2, "weight": 0.75, "hash": "0123456789ab"},
        {"name": "style.b_2", "version": 1, "weight": 1.0, "hash": "ba9876543210"},
    ]
    plain = spec(adapters=()).parameters(11, "3")  # no hashes known: no hash fields at all
    assert "hash" not in a1111_text(plain).lower()
    assert "adapters" not in plain and "model_hash" not in plain


def test_model_hash_is_a1111s_for_a_file_and_covers_every_weights_file_of_a_folder(tmp_path: Path) -> None:
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"weights" * 1000)
    hashes = ModelHashes(tmp_path / "cache" / "model_hashes.json")
    assert hashes.get(str(single)) == hashlib.sha256(single.read_bytes()).hexdigest()[:10]

    folder = tmp_path / "pipe"
    for rel, data in {
        "unet/a.safetensors": b"u" * 10,
        "vae/b.safetensors": b"v" * 5,
        "model_index.json": b"{}",
    }.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    expected = hashlib.sha256(b"u" * 10 + b"v" * 5).hexdigest()  # weights files in path order, json ignored
    assert weights_sha256(folder) == expected
    assert hashes.get(str(folder)) == expected[:10]
    cached = json.loads((tmp_path / "cache" / "model_hashes.json").read_text())
    assert cached[str(folder.resolve())]["sha256"] == expected
    # A fresh instance trusts the cache file while the files keep their sizes and mtimes (no re-read) ...
    cached[str(folder.resolve())]["sha256"] = "f" * 64
    (tmp_path / "cache" / "model_hashes.json").write_text(json.dumps(cached))
    assert ModelHashes(tmp_path / "cache" / "model_hashes.json").get(str(folder)) == "f" * 10
    # ... and hashes again once a weights file changes.
    (folder / "vae/b.safetensors").write_bytes(b"w" * 5)
    os.utime(folder / "vae/b.safetensors", ns=(1, 1))
    assert (
        ModelHashes(tmp_path / "cache" / "model_hashes.json").get(str(folder))
        == (hashlib.sha256(b"u" * 10 + b"w" * 5).hexdigest()[:10])
    )
    assert hashes.get("s3://bucket/model") == "" and hashes.get(str(tmp_path / "nope")) == ""


@pytest.mark.parametrize("family_folder", ["auraflow", "sdxl"])
def test_the_tiny_models_have_a_model_hash(tiny_models: Path, family_folder: str) -> None:
    got = ModelHashes().get(str(tiny_models / family_folder))
    assert len(got) == 10 and got == weights_sha256(tiny_models / family_folder)[:10]
