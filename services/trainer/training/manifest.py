"""The exported training manifest (`manifest.parquet`): one row per image with its captions, tags and prompt."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pony_common.blobs import BlobStore, open_uri
from pony_common.errors import InvalidArgument
from pony_common.manifest import TRAINING_COLUMNS, TRAINING_SCHEMA


@dataclass(frozen=True)
class ManifestItem:
    image_id: str
    image_uri: str
    width: int
    height: int
    captions: dict[str, str] = field(default_factory=dict)
    special_tags: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    prompt: str = ""


def _captions(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise InvalidArgument(where, "captions is not a JSON object") from None
    if isinstance(value, list):  # a parquet map column reads as [(key, value), ...]
        value = dict(value)
    if not isinstance(value, dict):
        raise InvalidArgument(where, "captions must map kind -> text")
    return {str(k): str(v) for k, v in value.items() if v}


def read_manifest(path: str | Path) -> list[ManifestItem]:
    """Reads `manifest.parquet` (a path or fsspec URI); relative `image_uri`s resolve against its folder."""
    p = Path(path)
    local = "://" not in str(path)
    try:
        with fsspec.open(str(path), "rb") as fh:
            table = pq.read_table(fh)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InvalidArgument("spec.manifest", f"cannot read manifest {p}: {exc}") from None
    missing = [c for c in TRAINING_COLUMNS if c not in table.column_names]
    if missing:
        raise InvalidArgument("spec.manifest", f"manifest {p} lacks columns {missing}")
    items = []
    remote_relative: bool | None = None
    for i, row in enumerate(table.select(list(TRAINING_COLUMNS)).to_pylist()):
        where = f"manifest[{i}]"
        if not row["image_id"] or not row["image_uri"]:
            raise InvalidArgument(where, "image_id and image_uri are required")
        uri = row["image_uri"]
        if local and "://" not in uri and not Path(uri).is_absolute() and (p.parent / uri).exists():
            uri = str(p.parent / uri)
        elif not local and "://" not in uri and not uri.startswith("/"):
            # A manifest in a bucket: its relative paths (the export's `images/...`) name files beside it, when
            # the first of them is there (else they are blob keys); one existence check, not one per row.
            if remote_relative is None:
                fs, root = fsspec.core.url_to_fs(str(path).rsplit("/", 1)[0])
                remote_relative = fs.exists(f"{root}/{uri}")
            if remote_relative:
                uri = f"{str(path).rsplit('/', 1)[0]}/{uri}"
        items.append(
            ManifestItem(
                image_id=row["image_id"],
                image_uri=uri,
                width=int(row["width"] or 0),
                height=int(row["height"] or 0),
                captions=_captions(row["captions"], where),
                special_tags=tuple(row["special_tags"] or ()),
                tags=tuple(row["tags"] or ()),
                prompt=row["prompt"] or "",
            )
        )
    if not items:
        raise InvalidArgument("spec.manifest", f"manifest {p} has no rows")
    return items


def write_manifest(path: str | Path, items: Sequence[ManifestItem]) -> Path:
    """Writes items with the training columns of the export schema (tests and demos; the curation export writes
    every column)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[Any]] = {name: [] for name in TRAINING_SCHEMA.names}
    for item in items:
        columns["image_id"].append(item.image_id)
        columns["image_uri"].append(item.image_uri)
        columns["width"].append(item.width)
        columns["height"].append(item.height)
        columns["captions"].append(json.dumps(item.captions, sort_keys=True))
        columns["special_tags"].append(list(item.special_tags))
        columns["tags"].append(list(item.tags))
        columns["prompt"].append(item.prompt)
    pq.write_table(pa.table(columns, schema=TRAINING_SCHEMA), p)
    return p


def read_image_bytes(uri: str, blobs: BlobStore | None = None) -> bytes:
    """The bytes behind an `image_uri`: any fsspec URI or path, else a key in the blob store."""
    if "://" in uri or Path(uri).is_absolute() or blobs is None:
        return open_uri(uri)
    return blobs.get(uri)
