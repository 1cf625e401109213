"""Near-duplicate groups from perceptual hashes, and which member of each group stays eligible (the best-scored)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping

from sqlalchemy import select, update

from pony_common.catalog.db import Catalog
from pony_common.catalog.models import AestheticScoreRow, ImageRow
from services.curation.phash import hamming

log = logging.getLogger(__name__)

# Hashes at most this many bits apart are near-duplicates (re-encodes and resizes land within 0..4).
DEFAULT_MAX_DISTANCE = 6


def group_hashes(hashes: Mapping[str, str], max_distance: int = DEFAULT_MAX_DISTANCE) -> dict[str, str]:
    """Connected components of "within max_distance bits": image id -> group id (the smallest id of its group),
    for images in a group of two or more only.

    Candidates come from banding: a 64-bit hash is cut into max_distance + 1 bands, and two hashes within
    max_distance bits agree on at least one band, so only images sharing a band value are compared."""
    ids = sorted(hashes)
    bands = max_distance + 1
    edges = [64 * b // bands for b in range(bands + 1)]
    parent = {i: i for i in ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        value = int(hashes[image_id], 16)
        for band in range(bands):
            lo, hi = edges[band], edges[band + 1]
            buckets[(band, (value >> lo) & ((1 << (hi - lo)) - 1))].append(image_id)
    for members in buckets.values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                if find(a) != find(b) and hamming(hashes[a], hashes[b]) <= max_distance:
                    ra, rb = find(a), find(b)
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = defaultdict(list)
    for image_id in ids:
        groups[find(image_id)].append(image_id)
    return {m: min(members) for members in groups.values() if len(members) > 1 for m in members}


def regroup(catalog: Catalog, max_distance: int = DEFAULT_MAX_DISTANCE) -> int:
    """Recomputes images.dup_group over the whole catalog from the stored pHashes; returns the number of
    images in a group. Then marks every group's non-best members is_duplicate."""
    with catalog.session() as s:
        rows = s.execute(select(ImageRow.id, ImageRow.phash, ImageRow.dup_group).where(ImageRow.phash.is_not(None)))
        current = {r.id: (r.phash, r.dup_group) for r in rows}
    groups = group_hashes({k: v[0] for k, v in current.items()}, max_distance)
    changed = [
        (image_id, groups.get(image_id)) for image_id, (_, old) in current.items() if groups.get(image_id) != old
    ]
    if changed:
        with catalog.session() as s:
            for image_id, group in changed:
                s.execute(update(ImageRow).where(ImageRow.id == image_id).values(dup_group=group))
    resolve_duplicates(catalog)
    return len(groups)


def resolve_duplicates(catalog: Catalog, group: str | None = None) -> int:
    """In each group (or just `group`), the best-scored member stays eligible and the rest are is_duplicate.

    Failed images never win; unscored ones rank below scored ones; ties go to the smallest id (deterministic).
    Returns how many images are marked duplicate."""
    with catalog.session() as s:
        query = (
            select(ImageRow.id, ImageRow.dup_group, ImageRow.status, ImageRow.is_duplicate, AestheticScoreRow.score)
            .outerjoin(AestheticScoreRow, AestheticScoreRow.image_id == ImageRow.id)
            .where(ImageRow.dup_group.is_not(None))
        )
        if group is not None:
            query = query.where(ImageRow.dup_group == group)
        members: dict[str, list[tuple[str, str, bool, float | None]]] = defaultdict(list)
        for r in s.execute(query):
            members[r.dup_group].append((r.id, r.status, r.is_duplicate, r.score))
        # Images that left every group are eligible again.
        if group is None:
            s.execute(
                update(ImageRow)
                .where(ImageRow.dup_group.is_(None), ImageRow.is_duplicate.is_(True))
                .values(is_duplicate=False)
            )
        marked = 0
        for rows in members.values():

            def rank(row: tuple[str, str, bool, float | None]) -> tuple[int, float, str]:
                image_id, status, _, score = row
                return (status == "failed", -(score if score is not None else -1.0), image_id)

            best = min(rows, key=rank)[0]
            for image_id, _, was_duplicate, _ in rows:
                duplicate = image_id != best
                marked += duplicate
                if duplicate != was_duplicate:
                    s.execute(update(ImageRow).where(ImageRow.id == image_id).values(is_duplicate=duplicate))
    return marked
