"""Storing a source: content-hash blobs and rows, a re-ingest adds nothing, corrupt files are failed with reasons."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from pony_common.blobs import BlobStore
from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from services.curation.duplicates import regroup
from services.curation.ingest import pending_ids, store_items
from services.curation.samples import write_sample_pool
from services.curation.sources import iter_source
from services.curation.store import stage_row


def test_sample_pool_is_deterministic(tmp_path: Path) -> None:
    a = write_sample_pool(tmp_path / "a", per_category=2, near_duplicates=1, corrupt=2, blocked=1)
    b = write_sample_pool(tmp_path / "b", per_category=2, near_duplicates=1, corrupt=2, blocked=1)
    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files_a)
    assert len(a.images) == 12 and len(a.blocked) == 1 and len(a.corrupt) == 2


def test_store_by_content_hash_is_idempotent_and_records_corrupt_files(settings: Settings, tmp_path: Path) -> None:
    pool = write_sample_pool(tmp_path / "pool", per_category=2, near_duplicates=2, corrupt=3, blocked=1)
    first = store_items(settings, iter_source(str(pool.root)))
    catalog = catalog_for(settings.database_url)
    # 12 originals + 2 near-duplicates + 3 corrupt; the exact duplicate shares its original's id.
    assert len(first.ids) == 17 and first.new == 17
    blobs = BlobStore(settings.blob_url)
    keys = list(blobs.list("images"))
    assert len(keys) == 17
    assert all(k == f"images/{k.split('/')[2][:2]}/{k.split('/')[2]}" for k in keys)
    with catalog.session() as s:
        failed = {r.id: r.error for r in s.scalars(select(ImageRow).where(ImageRow.status == "failed"))}
    assert len(failed) == 3
    assert all(e.startswith("invalid_image: ") for e in failed.values())
    assert any("empty image" in e for e in failed.values()) and any("truncated" in e for e in failed.values())
    assert all(stage_row(catalog, i, "decode").status == "failed" for i in failed)
    assert set(pending_ids(catalog, first.ids, resume=False)) == set(first.ids) - set(failed)

    second = store_items(settings, iter_source(str(pool.root)))
    assert second.new == 0 and second.ids == first.ids
    with catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(ImageRow)) == 17
    assert list(blobs.list("images")) == keys

    assert regroup(catalog) == 4  # two near-duplicate pairs
