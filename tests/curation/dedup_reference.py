"""The near-duplicate grouping the catalog used before the incremental index (issue 14): banded candidates compared
pair by pair, quadratic in practice. Kept as the reference that tests and bench/dedup_scale.py check against."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from services.curation.phash import hamming


def reference_group_hashes(hashes: Mapping[str, str], max_distance: int = 6) -> dict[str, str]:
    """Connected components of "within max_distance bits": image id -> group id (the smallest id of its group),
    for images in a group of two or more only (the pre-issue-14 `group_hashes`, verbatim)."""
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
