"""Versions of the aesthetic head: saved to the blob store, listed in the catalog (aesthetic_heads), one active."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, upsert
from pony_common.catalog.models import AestheticHeadRow
from pony_common.models.heads import HEAD_INFO, HEAD_WEIGHTS, HeadInfo, MLPHead, save_head

logger = logging.getLogger(__name__)

HEAD_PREFIX = "heads/aesthetic"


@dataclass(frozen=True)
class StoredHead:
    """A head version: its blob-store key prefix and a local folder `load_head` can read."""

    version: str
    key: str
    local_dir: Path
    active: bool


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


class HeadStore:
    """Writes `head.safetensors` + `head.json` under `heads/aesthetic/<version>/` in the blob store.

    The version is the first 12 hex digits of the weights' sha256, the same as `HeadInfo.version` after
    `load_head`, so the provenance a scorer reports names the row in aesthetic_heads.
    """

    def __init__(self, catalog: Catalog, blobs: BlobStore, cache_dir: str | Path) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.cache_dir = Path(cache_dir)

    def publish(self, head: MLPHead, info: HeadInfo, metrics: dict[str, Any], activate: bool) -> StoredHead:
        """Saves a new head version (idempotent for the same weights) and optionally makes it the active one."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            folder = save_head(Path(tmp) / "head", head, info)
            version = _digest(folder / HEAD_WEIGHTS)
            key = f"{HEAD_PREFIX}/{version}"
            for name in (HEAD_WEIGHTS, HEAD_INFO):
                self.blobs.put(f"{key}/{name}", (folder / name).read_bytes())
        with self.catalog.session() as session:
            upsert(
                session,
                AestheticHeadRow,
                {"version": version, "path": key, "metrics": metrics, "active": False},
                keys=["version"],
                update=["path", "metrics"],
            )
            if activate:
                session.execute(update(AestheticHeadRow).values(active=False))
                session.execute(update(AestheticHeadRow).where(AestheticHeadRow.version == version).values(active=True))
        logger.info("head published", extra={"version": version, "key": key, "active": activate})
        return StoredHead(version, key, self.local_dir(key, version), activate)

    def active(self) -> StoredHead | None:
        """The head marked active in the catalog, or None."""
        with self.catalog.session() as session:
            row = session.scalars(
                select(AestheticHeadRow)
                .where(AestheticHeadRow.active.is_(True))
                .order_by(AestheticHeadRow.created_at.desc())
            ).first()
            if row is None:
                return None
            version, key = row.version, row.path
        return StoredHead(version, key, self.local_dir(key, version), True)

    def local_dir(self, key: str, version: str) -> Path:
        """A local folder with the head's files: the blob folder itself on a local store, else a cached copy."""
        if Path(key).is_absolute() and Path(key).is_dir():
            return Path(key)
        direct = Path(self.blobs.path(key))
        if direct.is_dir() and (direct / HEAD_WEIGHTS).is_file():
            return direct
        target = self.cache_dir / version
        if not (target / HEAD_WEIGHTS).is_file():
            partial = self.cache_dir / f".partial-{version}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for name in (HEAD_WEIGHTS, HEAD_INFO):
                (partial / name).write_bytes(self.blobs.get(f"{key}/{name}"))
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        return target
