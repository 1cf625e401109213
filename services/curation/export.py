"""The training export of a selection, streamed in chunks (never the whole selection in memory), readable by the
trainers and loaders people use:

    DIR/manifest.parquet        one row per image in rank order (pony_common.manifest), `image_uri` relative to DIR
    DIR/images/<id>.<ext>       the image; `<id>.txt` beside it holds its prompt (kohya, OneTrainer, SimpleTuner)
    DIR/images/metadata.jsonl   Hugging Face `imagefolder`: `file_name`, `text` (the prompt) and the other columns
    DIR/shards/shard-NNNNNN.tar on request: WebDataset shards in a seeded shuffled order, one image key for all
                                (`<id>.png` by default, or `.jpg`), `<id>.json` (the row), `<id>.txt` (the prompt)
    DIR/multidatabackend.json, DIR/dataset.toml   SimpleTuner and kohya dataloader configs (dataloaders.py)
    DIR/export.json             what was exported: family, token budget and length distribution, shuffle seed

Prompts follow the model family's convention (pony_common.prompts: `v7` or `v6`) and fit its text encoder's token
budget, counted with the family's real tokenizer: extra tags are dropped first, then descriptions shortened, never
the special tags. File names come from catalog values, so they are checked first: an image id must be a content
hash (64 lower-case hex digits) and its blob key's extension a short alphanumeric one; a row that fails is skipped
with its reason, and nothing is ever written outside DIR. Every file is written whole (a temporary file renamed),
so re-running an export replaces it and a crash leaves no half-written file."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, catalog_for
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.manifest import SCHEMA
from pony_common.prompts import (
    V7,
    ImageTags,
    PromptConvention,
    assemble_prompt,
    convention,
    extra_tags_of,
    palette_tags,
    rating_tag,
    source_tag,
)
from pony_common.prompts.budget import FittedPrompt, TokenBudget, TokenStats, load_tokenizer
from pony_common.tags import cumulative_score_tags, parse_score_tag
from services.curation.dataloaders import DEFAULT_RESOLUTION, dataloader_files
from services.curation.records import ImageRecord, load_records
from services.curation.selection import load_selection

log = logging.getLogger(__name__)

SHARD_SIZE = 1000
CHUNK = 500  # records loaded, and manifest rows written, at a time
IO_THREADS = 8  # threads copying images and writing sidecars (file I/O; local disks and object stores alike)
SHARD_FORMATS = ("png", "jpg")
INFO_FILE = "export.json"
METADATA_FILE = "metadata.jsonl"
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_EXTENSION = re.compile(r"[a-z0-9]{1,8}")
_SAME_FORMAT = {"png": {"png"}, "jpg": {"jpg", "jpeg"}}
# Columns of metadata.jsonl besides `file_name` and `text` (the prompt).
METADATA_COLUMNS = (
    "image_id",
    "width",
    "height",
    "category",
    "score",
    "score_tag",
    "style_tag",
    "source_tag",
    "rating_tag",
    "palette_tags",
    "special_tags",
    "tags",
    "rank",
)


def export_name(rec: ImageRecord) -> str:
    """`<id>.<ext>`, the file name of a record's image in the export; ValueError (the reason) when the id is no
    content hash or the blob key has no plain extension."""
    if not _IMAGE_ID.fullmatch(rec.image_id):
        raise ValueError("the image id is not a content hash (64 hex digits)")
    ext = rec.blob_key.rsplit(".", 1)[-1] if "." in rec.blob_key.rsplit("/", 1)[-1] else ""
    if not _EXTENSION.fullmatch(ext):
        raise ValueError("the blob key has no plain file extension")
    return f"{rec.image_id}.{ext}"


def content_tags(rec: ImageRecord) -> list[str]:
    """Characters, then the content tags; the artist's name is left out (unless it is also a character)."""
    artist = (rec.artist or "").strip().lower()
    keep_names = {c.lower() for c in rec.characters}
    out = []
    for tag in (*rec.characters, *rec.tags):
        low = tag.lower()
        if artist and (low == artist or low == f"artist:{artist}") and low not in keep_names:
            continue
        if low.startswith("artist:"):
            continue
        out.append(tag)
    return list(dict.fromkeys(out))


def image_tags(rec: ImageRecord) -> ImageTags:
    """The attributes of a record its special tags are made of (the style tag as the style tagger wrote it, in
    the configured style tag format)."""
    return ImageTags(
        bucket=parse_score_tag(rec.score_tag or ""),
        styles=(rec.style_tag,) if rec.style_tag else (),
        source=source_tag(rec.category),
        rating=rating_tag(rec.rating),
        palette=tuple(palette_tags(rec.palette_tags)),
    )


def prompt_parts(rec: ImageRecord, family: PromptConvention = V7) -> tuple[list[str], list[str | None], list[str]]:
    """(special tags, [factual, stylistic description], extra tags) of a record in the family's convention."""
    special = family.image_special_tags(image_tags(rec))
    factual = rec.captions.get("medium") or rec.captions.get("short") or rec.captions.get("long")
    return special, [factual, rec.captions.get("style")], extra_tags_of(special, content_tags(rec))


def manifest_row(
    rec: ImageRecord,
    image_uri: str,
    rank: int,
    *,
    family: PromptConvention = V7,
    fitted: FittedPrompt | None = None,
) -> dict[str, Any]:
    """One manifest row of a record (pure); `fitted` is its prompt fitted to a token budget (else assembled)."""
    special, descriptions, tags = prompt_parts(rec, family)
    prompt = fitted.text if fitted is not None else assemble_prompt(special, *descriptions, tags)
    bucket = parse_score_tag(rec.score_tag or "")
    return {
        "image_id": rec.image_id,
        "image_uri": image_uri,
        "width": rec.width,
        "height": rec.height,
        "category": rec.category,
        "captions": json.dumps(rec.captions, sort_keys=True),
        "special_tags": special,
        "tags": tags,
        "prompt": prompt,
        "prompt_tokens": fitted.tokens if fitted is not None else None,
        "score": rec.score,
        "score_tag": rec.score_tag,
        "score_tags_v6": cumulative_score_tags(bucket) if bucket is not None else [],
        "style_tag": rec.style_tag,
        "style_cluster": rec.style_cluster,
        "palette_tags": palette_tags(rec.palette_tags),
        "source_tag": source_tag(rec.category),
        "rating": rec.rating,
        "rating_tag": rating_tag(rec.rating),
        "source": rec.source_site,
        "characters": rec.characters,
        "rank": rank,
    }


def metadata_line(row: dict[str, Any], file_name: str) -> str:
    """The `imagefolder` metadata of a manifest row: `file_name`, `text` and the columns people filter on."""
    return json.dumps({"file_name": file_name, "text": row["prompt"], **{k: row[k] for k in METADATA_COLUMNS}})


@dataclass
class ExportSummary:
    manifest: Path
    rows: int
    shards: list[Path]
    missing_style: int
    # Rows left out because a catalog value would make an unsafe file name: image id (repr) -> reason.
    skipped: dict[str, str] = field(default_factory=dict)
    family: str = "v7"
    tokens: dict[str, int] | None = None  # the prompts' token-length distribution (None: no tokenizer)
    tokenizer_note: str = ""  # why tokens were not counted
    info: Path | None = None


def family_budget(
    settings: Settings, family: PromptConvention, tokenizer: str | None
) -> tuple[TokenBudget | None, str]:
    """The family's token budget with its real tokenizer (`tokenizer`, else V7: the trainer's AuraFlow pipeline's
    `tokenizer/`; V6: the CLIP ViT-L/14 tokenizer of the scorer, SDXL's first text encoder's), or (None, why not)."""
    if tokenizer:
        path = tokenizer
    elif family.name == "v6":
        path = settings.model_path("scorer")
    else:
        path = f"{settings.model_path('trainer')}/tokenizer"
    if "://" not in path and not Path(path).is_dir():
        if tokenizer:
            raise InvalidArgument("tokenizer", f"no tokenizer folder at {path}")
        return None, f"no tokenizer at {path}: prompts were not counted or fitted (pass --tokenizer)"
    try:
        return TokenBudget(load_tokenizer(path), family), ""
    except (OSError, ValueError) as exc:
        raise InvalidArgument("tokenizer", f"cannot load the tokenizer at {path}: {exc}") from None


def _write_whole(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file in the same folder, renamed over it (a link is replaced)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Exporter:
    """One export run: the records of a selection in chunks -> images, sidecars, manifest, metadata, stats."""

    def __init__(
        self, settings: Settings, out: Path, family: PromptConvention, budget: TokenBudget | None, assign: bool
    ) -> None:
        self.settings = settings
        self.out = out
        self.family = family
        self.budget = budget
        self.assign = assign
        self.catalog: Catalog = catalog_for(settings.database_url)
        self.blobs = BlobStore(settings.blob_url)
        self.stats = TokenStats(budget.max_tokens if budget else family.max_tokens)
        self.skipped: dict[str, str] = {}
        self.missing_style = 0
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="export-io")

    def records(self, ids: Sequence[str], *, assign: bool = False) -> Iterator[list[ImageRecord]]:
        """The records of `ids` in order, a chunk at a time; with `assign`, untagged ones are style-tagged first."""
        for start in range(0, len(ids), CHUNK):
            chunk = list(ids[start : start + CHUNK])
            recs = load_records(self.catalog, chunk)
            if assign and any(r.style_version is None for r in recs):
                from services.curation.styles import assign_styles

                assign_styles(self.settings, [r.image_id for r in recs if r.style_version is None])
                recs = load_records(self.catalog, chunk)
            yield recs

    def fit(self, recs: list[ImageRecord]) -> list[FittedPrompt | None]:
        """Each record's prompt fitted to the budget (counted in one tokenizer call per chunk)."""
        if self.budget is None:
            return [None] * len(recs)
        parts = [prompt_parts(r, self.family) for r in recs]
        full = [assemble_prompt(s, *d, e) for s, d, e in parts]
        counts = self.budget.counts(full)
        fitted = []
        for (special, descriptions, extra), text, n in zip(parts, full, counts, strict=True):
            fitted.append(
                FittedPrompt(text, n) if n <= self.budget.max_tokens else self.budget.fit(special, descriptions, extra)
            )
        return fitted

    def copy_image(self, rec: ImageRecord) -> Path:
        target = self.out / "images" / export_name(rec)
        if target.is_symlink() or not target.is_file():
            _write_whole(target, self.blobs.get(rec.blob_key))
        return target

    def write_files(self, rec: ImageRecord, prompt: str) -> ValueError | None:
        """The image and its prompt sidecar (`<id>.txt`), each written whole; the reason when the row is skipped."""
        try:
            image = self.copy_image(rec)
        except ValueError as exc:
            return exc
        _write_whole(image.with_suffix(".txt"), prompt.encode())
        return None

    def _skip(self, rec: ImageRecord, exc: ValueError) -> None:
        self.skipped[repr(rec.image_id)] = str(exc)
        log.warning("export row skipped", extra={"image_id": repr(rec.image_id), "reason": str(exc)})

    def _rows(
        self, planned: list, futures: list, writer: pq.ParquetWriter, meta: io.TextIOBase, written: Written
    ) -> None:
        """The manifest rows and metadata lines of a chunk whose files are written (or skipped, with the reason)."""
        rows = []
        for (rec, fitted, row, name), future in zip(planned, futures, strict=True):
            error = future.result()
            if error is not None:
                self._skip(rec, error)
                continue
            if fitted is not None:
                self.stats.add(fitted)
            meta.write(metadata_line(row, name) + "\n")
            rows.append(row)
            written.add(name, row["rank"], fitted.tokens if fitted is not None else -1)
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))

    def write(self, ids: Sequence[str], manifest: Path, metadata: Path) -> Written:
        """Images, sidecars, the manifest and metadata.jsonl in rank order; what was written, compactly."""
        written = Written()
        fd, tmp_manifest = tempfile.mkstemp(dir=manifest.parent, prefix=f".{manifest.name}.")
        os.close(fd)
        fd, tmp_metadata = tempfile.mkstemp(dir=metadata.parent, prefix=f".{metadata.name}.")
        try:
            with pq.ParquetWriter(tmp_manifest, SCHEMA) as writer, os.fdopen(fd, "w", encoding="utf-8") as meta:
                rank = 0
                pending: tuple[list, list] | None = None
                for recs in self.records(ids, assign=self.assign):
                    self.missing_style += sum(r.style_version is None for r in recs)
                    planned = []
                    for rec, fitted in zip(recs, self.fit(recs), strict=True):
                        rank += 1
                        try:
                            name = export_name(rec)
                        except ValueError as exc:
                            self._skip(rec, exc)
                            continue
                        row = manifest_row(rec, f"images/{name}", rank - 1, family=self.family, fitted=fitted)
                        planned.append((rec, fitted, row, name))
                    # The chunk's files are written by threads (file I/O) while the next chunk is read from the
                    # catalog; its rows are written once its files are, so everything stays in rank order.
                    futures = [self.io.submit(self.write_files, p[0], p[2]["prompt"]) for p in planned]
                    if pending is not None:
                        self._rows(*pending, writer, meta, written)
                    pending = (planned, futures)
                if pending is not None:
                    self._rows(*pending, writer, meta, written)
            os.replace(tmp_manifest, manifest)
            os.replace(tmp_metadata, metadata)
        finally:
            Path(tmp_manifest).unlink(missing_ok=True)
            Path(tmp_metadata).unlink(missing_ok=True)
        return written

    def remove_stale(self, written: Written) -> int:
        """Images and sidecars an earlier export of this folder left that this one did not write (by name: a
        content hash and an extension), so loaders that list the folder see this export only."""
        keep = {name.split(".", 1)[0] for name in written.names}
        removed = 0
        for path in (self.out / "images").iterdir():
            stem, _, ext = path.name.partition(".")
            if _IMAGE_ID.fullmatch(stem) and _EXTENSION.fullmatch(ext) and stem not in keep:
                path.unlink()
                removed += 1
        return removed

    def shards(self, written: Written, folder: Path, shard_size: int, seed: int, fmt: str) -> list[Path]:
        """WebDataset shards of the written images in a seeded shuffled order, one shard in memory at a time (rows
        recomputed from the catalog; the prompt is the sidecar's, so shards and sidecars agree)."""
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("shard-*.tar"):
            old.unlink()
        order = list(range(len(written)))
        random.Random(seed).shuffle(order)
        images = self.out / "images"
        paths = []
        for n, start in enumerate(range(0, len(order), max(1, shard_size))):
            members = order[start : start + shard_size]
            by_id = {r.image_id: r for recs in self.records([written.image_id(i) for i in members]) for r in recs}
            path = folder / f"shard-{n:06d}.tar"
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
                    for i in members:
                        image = images / written.names[i]
                        image_id = written.image_id(i)
                        prompt = image.with_suffix(".txt").read_text(encoding="utf-8")
                        tokens = written.tokens[i]
                        fitted = FittedPrompt(prompt, tokens) if tokens >= 0 else None
                        row = manifest_row(
                            by_id[image_id], image.name, written.ranks[i], family=self.family, fitted=fitted
                        )
                        row = {**row, "prompt": prompt, "image_uri": f"{image_id}.{fmt}"}
                        _add(tar, f"{image_id}.{fmt}", shard_image(image, fmt))
                        _add(tar, f"{image_id}.json", json.dumps(row, sort_keys=True).encode())
                        _add(tar, f"{image_id}.txt", prompt.encode())
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            paths.append(path)
        return paths


@dataclass
class Written:
    """The exported images in rank order, compactly: file name, selection rank, prompt tokens (-1: not counted)."""

    names: list[str] = field(default_factory=list)
    ranks: array = field(default_factory=lambda: array("l"))
    tokens: array = field(default_factory=lambda: array("l"))

    def add(self, name: str, rank: int, tokens: int) -> None:
        self.names.append(name)
        self.ranks.append(rank)
        self.tokens.append(tokens)

    def image_id(self, i: int) -> str:
        return self.names[i].split(".", 1)[0]

    def __len__(self) -> int:
        return len(self.names)


def export_selection(
    settings: Settings,
    out_dir: str | Path,
    *,
    name: str = "default",
    webdataset: bool = False,
    shard_size: int = SHARD_SIZE,
    assign_missing_styles: bool = True,
    family: str = "v7",
    tokenizer: str | None = None,
    seed: int = 0,
    shard_format: str = "png",
    resolution: int = DEFAULT_RESOLUTION,
) -> ExportSummary:
    """`ponyctl export`: writes the export of selection `name` into `out_dir` (see the module docstring).

    Images of the selection without a style tag under the active cluster set are tagged first (one batch call to
    the style tagger per chunk) unless `assign_missing_styles` is off."""
    try:
        conv = convention(family)
    except ValueError as exc:
        raise InvalidArgument("family", str(exc)) from None
    if shard_format not in SHARD_FORMATS:
        raise InvalidArgument("shard_format", f"must be one of {', '.join(SHARD_FORMATS)}, got {shard_format!r}")
    catalog = catalog_for(settings.database_url)
    ids = load_selection(catalog, name)
    if not ids:
        raise InvalidArgument("name", f"selection {name!r} is empty or does not exist")
    budget, note = family_budget(settings, conv, tokenizer)
    out = Path(out_dir).absolute()
    (out / "images").mkdir(parents=True, exist_ok=True)
    run = _Exporter(settings, out, conv, budget, assign_missing_styles)
    manifest = out / "manifest.parquet"
    try:
        written = run.write(ids, manifest, out / "images" / METADATA_FILE)
    finally:
        run.io.shutdown()
    stale = run.remove_stale(written)
    shards = run.shards(written, out / "shards", shard_size, seed, shard_format) if webdataset else []
    for file_name, data in dataloader_files(out, resolution).items():
        _write_whole(out / file_name, data)
    tokens = run.stats.as_dict() if budget is not None else None
    info = {
        "selection": name,
        "family": conv.name,
        "rows": len(written),
        "skipped": len(run.skipped),
        "missing_style": run.missing_style,
        "stale_files_removed": stale,
        "tokens": tokens,
        "tokenizer_note": note,
        "shards": len(shards),
        "shard_size": shard_size,
        "shard_format": shard_format,
        "shuffle_seed": seed,
        "resolution": resolution,
    }
    _write_whole(out / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    log.info("exported", extra={"dir": str(out), **{k: v for k, v in info.items() if k != "tokens"}})
    return ExportSummary(
        manifest, len(written), shards, run.missing_style, run.skipped, conv.name, tokens, note, out / INFO_FILE
    )


def shard_image(image: Path, fmt: str) -> bytes:
    """The image's bytes as `fmt`: as stored when it already is, else re-encoded (PNG: lossless; JPEG: quality
    95, transparency flattened on white)."""
    data = image.read_bytes()
    if image.suffix.lower().lstrip(".") in _SAME_FORMAT[fmt]:
        return data
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        buffer = io.BytesIO()
        if fmt == "png":
            keep = img if img.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16") else img.convert("RGB")
            keep.save(buffer, format="PNG")
        else:
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            flat.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))
