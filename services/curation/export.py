"""The training export: `DIR/manifest.parquet` (one row per selected image, images copied to `DIR/images/`)
and, on request, WebDataset shards `DIR/shards/shard-NNNNNN.tar` (`<id>.<ext>`, `<id>.json`, `<id>.txt`).

File names come from catalog values, so they are checked first: an image id must be a content hash (64 lower-case
hex digits) and its blob key's extension a short alphanumeric one; a row that fails is skipped with its reason,
and nothing is ever written outside DIR."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pony_common.blobs import BlobStore
from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.manifest import SCHEMA
from pony_common.prompts import assemble_prompt, rating_tag, source_tag, special_tags
from pony_common.tags import cumulative_score_tags, parse_score_tag
from services.curation.records import ImageRecord, load_records
from services.curation.selection import load_selection

log = logging.getLogger(__name__)

SHARD_SIZE = 1000
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_EXTENSION = re.compile(r"[a-z0-9]{1,8}")


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


def manifest_row(rec: ImageRecord, image_uri: str, rank: int) -> dict[str, Any]:
    """One manifest row of a record (pure)."""
    special = special_tags(rec.score_tag, rec.style_tag, source_tag(rec.category), rating_tag(rec.rating))
    factual = rec.captions.get("medium") or rec.captions.get("short") or rec.captions.get("long")
    tags = [t for t in content_tags(rec) if t not in special]
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
        "prompt": assemble_prompt(special, factual, rec.captions.get("style"), tags),
        "score": rec.score,
        "score_tag": rec.score_tag,
        "score_tags_v6": cumulative_score_tags(bucket) if bucket is not None else [],
        "style_tag": rec.style_tag,
        "style_cluster": rec.style_cluster,
        "palette_tags": rec.palette_tags,
        "source_tag": source_tag(rec.category),
        "rating": rec.rating,
        "rating_tag": rating_tag(rec.rating),
        "source": rec.source_site,
        "characters": rec.characters,
        "rank": rank,
    }


@dataclass
class ExportSummary:
    manifest: Path
    rows: int
    shards: list[Path]
    missing_style: int
    # Rows left out because a catalog value would make an unsafe file name: image id (repr) -> reason.
    skipped: dict[str, str] = field(default_factory=dict)


def export_selection(
    settings: Settings,
    out_dir: str | Path,
    *,
    name: str = "default",
    webdataset: bool = False,
    shard_size: int = SHARD_SIZE,
    assign_missing_styles: bool = True,
) -> ExportSummary:
    """`ponyctl export`: writes the manifest of selection `name` into `out_dir`, images copied to `out_dir/images`.

    Images of the selection without a style tag under the active cluster set are tagged first (one batch
    call to the style tagger) unless `assign_missing_styles` is off."""
    catalog = catalog_for(settings.database_url)
    ids = load_selection(catalog, name)
    if not ids:
        raise InvalidArgument("name", f"selection {name!r} is empty or does not exist")
    out = Path(out_dir).absolute()
    records = load_records(catalog, ids)
    if assign_missing_styles and any(r.style_version is None for r in records):
        from services.curation.styles import assign_styles

        assign_styles(settings, [r.image_id for r in records if r.style_version is None])
        records = load_records(catalog, ids)
    blobs = BlobStore(settings.blob_url)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for rank, rec in enumerate(records):
        try:
            target = out / "images" / export_name(rec)
            if target.is_symlink() or not target.is_file():
                data = blobs.get(rec.blob_key)
                target.unlink(missing_ok=True)  # a link planted in DIR is replaced, never written through
                target.write_bytes(data)
        except ValueError as exc:
            skipped[repr(rec.image_id)] = str(exc)
            log.warning("export row skipped", extra={"image_id": repr(rec.image_id), "reason": str(exc)})
            continue
        files[rec.image_id] = target
        rows.append(manifest_row(rec, str(target), rank))
    manifest = out / "manifest.parquet"
    if manifest.is_symlink():
        manifest.unlink()
    columns = {f.name: [r[f.name] for r in rows] for f in SCHEMA}
    pq.write_table(pa.table(columns, schema=SCHEMA), manifest)
    shards = write_shards(out / "shards", rows, files, shard_size) if webdataset else []
    missing = sum(r.style_version is None for r in records)
    extra = {"dir": str(out), "rows": len(rows), "shards": len(shards), "missing_style": missing}
    log.info("exported", extra={**extra, "skipped": len(skipped)})
    return ExportSummary(manifest, len(rows), shards, missing, skipped)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, rows: list[dict[str, Any]], files: dict[str, Path], shard_size: int) -> list[Path]:
    """WebDataset shards: per image `<id>.<ext>` (the bytes), `<id>.json` (the manifest row), `<id>.txt` (prompt)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("shard-*.tar"):
        old.unlink()
    shards = []
    for n, start in enumerate(range(0, len(rows), max(1, shard_size))):
        path = folder / f"shard-{n:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for row in rows[start : start + shard_size]:
                image = files[row["image_id"]]
                meta = {**row, "image_uri": image.name}
                _add(tar, f"{row['image_id']}{image.suffix}", image.read_bytes())
                _add(tar, f"{row['image_id']}.json", json.dumps(meta, sort_keys=True).encode())
                _add(tar, f"{row['image_id']}.txt", row["prompt"].encode())
        shards.append(path)
    return shards
