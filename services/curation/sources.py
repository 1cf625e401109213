"""Ingest sources: a folder of images with sidecar tag files, a JSONL/Parquet manifest, or WebDataset tar shards.

Every reader yields `SourceItem`s (bytes plus metadata) in a deterministic order; nothing here touches the catalog.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pony_common.blobs import open_uri
from pony_common.errors import InvalidArgument

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
MANIFEST_EXTENSIONS = (".jsonl", ".ndjson", ".parquet")


@dataclass
class SourceItem:
    """One image from a source, with the metadata the source gave for it."""

    uri: str
    data: bytes
    tags: list[str] = field(default_factory=list)
    characters: list[str] = field(default_factory=list)
    artist: str | None = None
    category: str | None = None
    source_site: str | None = None
    # Why the bytes could not be read (the item is still reported, never silently dropped).
    error: str | None = None


def split_tags(value: Any) -> list[str]:
    """Tags from a list or a comma-separated string, stripped, de-duplicated in order.

    Booru underscores become spaces (`long_hair` -> `long hair`) except in short emoticon tags such as `^_^`."""
    if value is None:
        return []
    raw = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out: list[str] = []
    seen: set[str] = set()
    for tag in raw:
        tag = " ".join(tag.strip().split())
        if len(tag) > 3 and any(c.isalpha() for c in tag):
            tag = tag.replace("_", " ")
        if tag and tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """SourceItem fields from a sidecar/manifest record (tags, characters, artist, category, source/source_site)."""
    return {
        "tags": split_tags(meta.get("tags")),
        "characters": split_tags(meta.get("characters")),
        "artist": _text(meta.get("artist")),
        "category": _text(meta.get("category")),
        "source_site": _text(meta.get("source_site") or meta.get("source") or meta.get("site")),
    }


def _read_sidecar(image: Path) -> dict[str, Any]:
    """The `.json` (preferred) or `.txt` next to an image (`a.png` -> `a.json` / `a.txt`, or `a.png.txt`)."""
    for candidate in (image.with_suffix(".json"), Path(f"{image}.json")):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("bad sidecar", extra={"path": str(candidate), "error": str(exc)})
                return {}
            return _metadata(meta if isinstance(meta, dict) else {"tags": meta})
    for candidate in (image.with_suffix(".txt"), Path(f"{image}.txt")):
        if candidate.is_file():
            return _metadata({"tags": candidate.read_text(encoding="utf-8", errors="replace")})
    return _metadata({})


def read_folder(root: Path) -> Iterator[SourceItem]:
    """Images under `root` (recursively, sorted by path) with their sidecar tag files."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        meta = _read_sidecar(path)
        yield SourceItem(uri=str(path.absolute()), data=path.read_bytes(), **meta)


def _manifest_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield i, record
        return
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument("source", f"{path}:{i + 1}: not a JSON object: {exc.msg}") from None
            if not isinstance(record, dict):
                raise InvalidArgument("source", f"{path}:{i + 1}: not a JSON object")
            yield i, record


def read_manifest(path: Path) -> Iterator[SourceItem]:
    """A JSONL or Parquet manifest: one record per image with `uri` (relative paths are relative to the manifest)
    and optional tags, characters, artist, category, source/source_site."""
    for i, record in _manifest_records(path):
        uri = _text(record.get("uri") or record.get("path") or record.get("image"))
        if not uri:
            raise InvalidArgument("source", f"{path}: record {i} has no uri")
        resolved = uri if "://" in uri or uri.startswith("/") else str((path.parent / uri).absolute())
        meta = _metadata(record)
        try:
            data = open_uri(resolved)
        except (OSError, ValueError) as exc:
            yield SourceItem(uri=resolved, data=b"", error=f"cannot read {resolved}: {exc}", **meta)
            continue
        yield SourceItem(uri=resolved, data=data, **meta)


def _shard_members(shard: Path) -> dict[str, dict[str, bytes]]:
    """A shard's file members grouped by key; InvalidArgument("source") when it is not a readable tar archive."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("."):
                    continue
                key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower()
                fh = tar.extractfile(member)
                if fh is not None:
                    groups.setdefault(key, {})[ext] = fh.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(": ")
        raise InvalidArgument(
            "source", f"{shard}: not a readable tar shard ({reason}); re-create it or leave it out of the source"
        ) from None
    return groups


def read_shards(shards: list[Path]) -> Iterator[SourceItem]:
    """WebDataset tar shards: members grouped by key (name up to the first dot of the base name);
    the image member plus an optional `.json` and/or `.txt` (tags) member per key."""
    for shard in shards:
        groups = _shard_members(shard)
        for key in sorted(groups):
            parts = groups[key]
            image_ext = next((e for e in parts if f".{e}" in IMAGE_EXTENSIONS), None)
            if image_ext is None:
                continue
            meta: dict[str, Any] = {}
            if "json" in parts:
                try:
                    loaded = json.loads(parts["json"].decode("utf-8"))
                    meta = loaded if isinstance(loaded, dict) else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = {}
            if "txt" in parts and not meta.get("tags"):
                meta["tags"] = parts["txt"].decode("utf-8", errors="replace")
            yield SourceItem(uri=f"{shard.absolute()}#{key}.{image_ext}", data=parts[image_ext], **_metadata(meta))


def iter_source(source: str) -> Iterator[SourceItem]:
    """Items of any supported source: a folder (images + sidecars, or only .tar shards), a manifest file,
    a .tar shard or a glob of shards. Raises InvalidArgument("source") when `source` is none of these."""
    path = Path(source)
    if path.is_dir():
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())
        shards = sorted(path.glob("*.tar"))
        if not has_images and shards:
            return read_shards(shards)
        return read_folder(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in MANIFEST_EXTENSIONS:
            return read_manifest(path)
        if suffix == ".tar" or path.name.endswith((".tar.gz", ".tgz")):
            return read_shards([path])
        raise InvalidArgument("source", f"{source}: not a folder, a .jsonl/.parquet manifest or a .tar shard")
    matches = sorted(Path(p) for p in glob.glob(source))
    if matches and all(p.name.endswith(".tar") for p in matches):
        return read_shards(matches)
    raise InvalidArgument("source", f"{source}: no such folder, manifest or shard")
