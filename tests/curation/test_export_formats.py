"""The export read back by the libraries trainers use: Hugging Face `datasets` (imagefolder with captions, parquet,
webdataset) and `webdataset`; relative paths, `.txt` sidecars, one image key, a seeded shuffle, the SimpleTuner and
kohya configs, and prompts fitted to the V7 token budget (the real tiny AuraFlow tokenizer) without losing the
special tags."""

from __future__ import annotations

import io
import json
import tarfile
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import (
    AestheticScoreRow,
    CaptionRow,
    ImageRow,
    SafetyDecisionRow,
    StyleAssignmentRow,
    StyleClusterSetRow,
)
from pony_common.config import Settings
from pony_common.prompts.budget import load_tokenizer
from services.curation.export import export_selection
from services.curation.ingest import store_items
from services.curation.sources import iter_source
from services.curation.store import SelectionRow
from services.stack.tiny import ENGLISH_WORDS
from services.trainer.training.manifest import read_manifest

IMAGES = 7


@pytest.fixture
def selection(settings: Settings, tiny_models: Path, tmp_path: Path) -> Settings:
    """A catalog with a selection of PNG and JPEG images, captions, scores, style tags with palettes, ratings; one
    image with so many tags that its prompt must be cut."""
    settings = settings.replace(models_dir=str(tiny_models))
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        pixels = rng.integers(0, 255, (24 + 8 * i, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pool / f"{i}.{'png' if i % 2 else 'jpg'}", quality=90)
    ids = store_items(settings, iter_source(str(pool), settings)).ids
    assert len(ids) == IMAGES
    catalog = catalog_for(settings.database_url)
    many = [ENGLISH_WORDS[i % len(ENGLISH_WORDS)] for i in range(400)]
    with catalog.session() as s:
        s.add(
            StyleClusterSetRow(
                version="cs_test", k=2, per_family=True, dim=2, centroids=b"", clusters=[], params={}, active=True
            )
        )
        for n, image in enumerate(ids):
            row = s.get(ImageRow, image)
            row.category, row.tags = "anime", many if n == 2 else ["fox", "snow"]
            s.add(
                CaptionRow(
                    image_id=image,
                    kind="medium",
                    text=f"A fox number {n}.",
                    model="m",
                    model_version="1",
                    template_version="t",
                )
            )
            s.add(
                CaptionRow(
                    image_id=image, kind="style", text="Ink lines.", model="m", model_version="1", template_version="t"
                )
            )
            score = 0.95 - 0.1 * n
            s.add(
                AestheticScoreRow(
                    image_id=image,
                    raw=score,
                    score=score,
                    score_tag=f"score_{int(score * 10)}",
                    model="c",
                    model_version="1",
                    head_version="h",
                )
            )
            s.add(
                StyleAssignmentRow(
                    image_id=image,
                    cluster_set_version="cs_test",
                    cluster_id=n % 2,
                    tag=f"anime_{n % 2}",
                    distance=0.1,
                    palette_tags=["palette_red", "palette_navy"],
                )
            )
            s.add(SafetyDecisionRow(image_id=image, rating="safe", decision="allow", model="s", model_version="1"))
            s.add(SelectionRow(name="default", image_id=image, rank=n, category="anime"))
    return settings


def test_export_reads_back_in_every_format(
    selection: Settings, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "export"
    (out / "images").mkdir(parents=True)
    stale = [out / "images" / f"{'e' * 64}.{ext}" for ext in ("png", "txt")]  # an earlier export's image
    for path in [*stale, out / "images" / "notes.md"]:
        path.write_bytes(b"old")
    summary = export_selection(selection, out, webdataset=True, shard_size=3, seed=3)
    assert not any(p.exists() for p in stale) and (out / "images" / "notes.md").read_bytes() == b"old"
    (out / "images" / "notes.md").unlink()  # not a file loaders of the export should meet
    assert summary.rows == IMAGES and len(summary.shards) == 3 and not summary.skipped
    rows = pq.read_table(summary.manifest).to_pylist()
    # Relative paths, resolved by the trainer's reader against the manifest's folder.
    assert all(not Path(r["image_uri"]).is_absolute() and (out / r["image_uri"]).is_file() for r in rows)
    items = read_manifest(summary.manifest)
    assert all(Path(i.image_uri) == out / r["image_uri"] for i, r in zip(items, rows, strict=True))
    assert [r["rank"] for r in rows] == list(range(IMAGES))
    # Sidecars next to the images hold the prompt.
    for r in rows:
        assert (out / r["image_uri"]).with_suffix(".txt").read_text() == r["prompt"]

    # The token budget: counted with the real tokenizer, the long prompt cut by its extra tags, specials kept.
    tokenizer = load_tokenizer(tiny_models / "auraflow" / "tokenizer")
    for r in rows:
        assert r["prompt_tokens"] == len(tokenizer(r["prompt"])["input_ids"]) <= 256
        assert r["prompt"].startswith(", ".join(r["special_tags"]) + ", A fox number")
        assert r["special_tags"][-2:] == ["palette_red", "palette_navy"]
    cut = rows[2]
    assert len(cut["tags"]) == 400 and cut["prompt"].count(", ") < 400 + len(cut["special_tags"])
    assert summary.tokens is not None and summary.tokens["cut"] == 1 and summary.tokens["max"] <= 256
    info = json.loads((out / "export.json").read_text())
    assert (info["shuffle_seed"], info["family"], info["tokens"]) == (3, "v7", summary.tokens)

    # Shards: one image key (.png, the JPEGs re-encoded losslessly), in a seeded shuffled order.
    keys = []
    for shard in summary.shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert {n.split(".", 1)[1] for n in names} == {"png", "json", "txt"}
            keys += [n.split(".", 1)[0] for n in names if n.endswith(".png")]
            for name in names:
                if name.endswith(".png"):
                    image_id = name.split(".", 1)[0]
                    (source,) = [out / r["image_uri"] for r in rows if r["image_id"] == image_id]
                    shard_px = np.asarray(Image.open(io.BytesIO(tar.extractfile(name).read())))
                    assert np.array_equal(shard_px, np.asarray(Image.open(source).convert("RGB")))
    ranked = [r["image_id"] for r in rows]
    assert sorted(keys) == sorted(ranked) and keys != ranked
    again = export_selection(selection, tmp_path / "again", webdataset=True, shard_size=3, seed=3)
    assert _png_keys(again.shards) == keys

    # Dataloader configs.
    toml = tomllib.loads((out / "dataset.toml").read_text())
    assert toml["general"]["caption_extension"] == ".txt"
    assert Path(toml["datasets"][0]["subsets"][0]["image_dir"]) == out / "images"
    backends = json.loads((out / "multidatabackend.json").read_text())
    assert backends[0]["caption_strategy"] == "textfile" and Path(backends[0]["instance_data_dir"]) == out / "images"
    assert any(b.get("dataset_type") == "text_embeds" for b in backends)

    # Hugging Face datasets, offline, its cache in tmp_path.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    cache = str(tmp_path / "hf")
    by_id = {r["image_id"]: r for r in rows}
    folder = datasets.load_dataset("imagefolder", data_dir=str(out / "images"), split="train", cache_dir=cache)
    assert len(folder) == IMAGES
    for example in folder:
        assert example["text"] == by_id[example["image_id"]]["prompt"]
        assert example["image"].size == (32, by_id[example["image_id"]]["height"])
    table = datasets.load_dataset("parquet", data_files=str(summary.manifest), split="train", cache_dir=cache)
    assert table["prompt"] == [r["prompt"] for r in rows]
    shards = datasets.load_dataset(
        "webdataset", data_files={"train": [str(p) for p in summary.shards]}, split="train", cache_dir=cache
    )
    assert [e["__key__"] for e in shards] == keys
    for example in shards:
        assert example["txt"] == by_id[example["__key__"]]["prompt"] == example["json"]["prompt"]
        assert example["png"].size[0] == 32

    # The webdataset library.
    import webdataset as wds

    samples = list(wds.WebDataset([str(p) for p in summary.shards], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == keys
    assert all(s["txt"] == by_id[s["__key__"]]["prompt"] and s["png"].size[0] == 32 for s in samples)


def _png_keys(shards: list[Path]) -> list[str]:
    keys = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".png")]
    return keys


def test_the_export_verb_prints_the_token_distribution(
    selection: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from pony_common.cli.main import main

    for key, value in selection.to_env().items():
        monkeypatch.setenv(key, value)
    assert main(["export", str(tmp_path / "out"), "--family", "v6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[0])
    assert summary["family"] == "v6" and summary["tokens"]["prompts"] == IMAGES and summary["tokens"]["cut"] == 1
    assert lines[1].startswith("v6 prompt tokens (limit 77): min ") and "1 of 7 prompts cut" in lines[1]
    row = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()[0]
    assert row["special_tags"][:2] == ["score_9", "score_8_up"]  # the V6 convention, bucket 9
    assert main(["export", str(tmp_path / "bad"), "--tokenizer", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer" in err[0]


def test_a_manifest_moved_to_a_bucket_resolves_its_relative_paths_beside_it() -> None:
    import fsspec
    import pyarrow as pa

    from pony_common.manifest import SCHEMA

    fs = fsspec.filesystem("memory")
    root = "memory://pony-export-test"
    row = {f.name: None for f in SCHEMA} | {
        "image_id": "ab" * 32,
        "image_uri": f"images/{'ab' * 32}.png",
        "width": 8,
        "height": 8,
        "captions": "{}",
        "special_tags": ["score_9"],
        "tags": [],
        "prompt": "score_9",
    }
    try:
        with fs.open(f"{root}/manifest.parquet", "wb") as fh:
            pq.write_table(pa.table({k: [v] for k, v in row.items()}, schema=SCHEMA), fh)
        fs.pipe(f"{root}/images/{'ab' * 32}.png", b"png bytes")
        (item,) = read_manifest(f"{root}/manifest.parquet")
        assert item.image_uri == f"{root}/images/{'ab' * 32}.png"
    finally:
        fs.rm(root, recursive=True)
