"""Near-duplicates: pHash is stable under re-encoding and resizing, banded grouping finds every close pair,
and the best-scored image of each group stays eligible."""

from __future__ import annotations

import io
import random

from PIL import Image
from sqlalchemy import select, update

from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from services.curation.duplicates import group_hashes, regroup, resolve_duplicates
from services.curation.phash import hamming, phash
from services.curation.samples import draw_image
from tests.curation.pool import add_processed


def _reencode(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_phash_is_stable_under_reencoding_and_resizing_and_differs_between_images() -> None:
    rng = random.Random(1)
    images = [draw_image(cat, rng, 96) for cat in ("pony", "anime", "western", "realism", "furry", "other")]
    for img in images:
        h = phash(img)
        assert len(h) == 16
        assert hamming(h, phash(_reencode(img, 60))) <= 4
        assert hamming(h, phash(img.resize((64, 64)).resize((120, 120)))) <= 6
    distances = [hamming(phash(a), phash(b)) for i, a in enumerate(images) for b in images[i + 1 :]]
    assert min(distances) > 6


def test_banded_grouping_matches_brute_force() -> None:
    rng = random.Random(7)
    hashes: dict[str, str] = {}
    for n in range(300):
        base = rng.getrandbits(64)
        hashes[f"{n:04d}a"] = f"{base:016x}"
        if n % 5 == 0:  # a near copy: flip up to 6 random bits
            flipped = base
            for bit in rng.sample(range(64), rng.randint(0, 6)):
                flipped ^= 1 << bit
            hashes[f"{n:04d}b"] = f"{flipped:016x}"
    groups = group_hashes(hashes, max_distance=6)
    ids = sorted(hashes)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if hamming(hashes[a], hashes[b]) <= 6:
                assert groups[a] == groups[b]
    for n in range(0, 300, 5):
        assert groups[f"{n:04d}a"] == groups[f"{n:04d}b"] == f"{n:04d}a"
    assert all(g == min(m for m in groups if groups[m] == g) for g in groups.values())


def test_best_scored_member_of_a_group_stays_eligible(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    low = add_processed(catalog, "low", "anime", 0.3, phash="00000000000000ff")
    high = add_processed(catalog, "high", "anime", 0.8, phash="00000000000000fe")
    broken = add_processed(catalog, "broken", "anime", 0.99, phash="00000000000000fc", status="failed")
    other = add_processed(catalog, "other", "anime", 0.5, phash="ffffffffffff0000")
    assert regroup(catalog) == 3
    with catalog.session() as s:
        rows = {r.id: r for r in s.scalars(select(ImageRow))}
    assert rows[low].dup_group == rows[high].dup_group == rows[broken].dup_group == min(low, high, broken)
    assert rows[other].dup_group is None
    assert [rows[i].is_duplicate for i in (low, high, broken, other)] == [True, False, True, False]
    # When the other member later scores better, it takes over.
    add_processed(catalog, "low", "anime", 0.95, phash="00000000000000ff")
    resolve_duplicates(catalog)
    with catalog.session() as s:
        assert s.get(ImageRow, low).is_duplicate is False
        assert s.get(ImageRow, high).is_duplicate is True
    # An image whose hash no longer matches leaves the group and is eligible again.
    with catalog.session() as s:
        s.execute(update(ImageRow).where(ImageRow.id == high).values(phash="f0f0f0f0f0f0f0f0"))
    regroup(catalog)
    with catalog.session() as s:
        assert s.get(ImageRow, high).dup_group is None and s.get(ImageRow, high).is_duplicate is False
