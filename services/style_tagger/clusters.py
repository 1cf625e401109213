"""Style clustering: k-means over style embeddings (global or per content family) with the artist guard.

The guard: a cluster in which one artist holds more than `max_artist_share` of the images would make its
style tag a stand-in for that artist. Such a cluster is split in two (k-means inside it); a part under the
limit becomes a normal cluster (status "split"), a part still over it is "flagged" and carries no tag. When
no part gets under the limit the whole cluster is flagged. (Splitting cannot lower the share everywhere:
the parent's share is the size-weighted mean of its parts', so it isolates the artist rather than hides it.)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

STATUS_OK = "ok"
STATUS_SPLIT = "split"
STATUS_FLAGGED = "flagged"
GLOBAL_FAMILY = ""
MIN_SPLIT_SIZE = 4
STORED_EXAMPLES = 16


@dataclass
class EmbeddingTable:
    """Style embeddings with what the fit needs to know about each image."""

    image_ids: list[str]
    vectors: np.ndarray  # (n, dim) float32
    artists: list[str | None]
    families: list[str]

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        n = len(self.image_ids)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n or len(self.artists) != n or len(self.families) != n:
            raise ValueError("image_ids, vectors, artists and families must describe the same images")

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class StyleCluster:
    id: int
    tag: str  # empty when flagged
    family: str
    size: int
    top_artist: str
    top_artist_share: float
    status: str
    reason: str
    examples: list[str] = field(default_factory=list)  # image ids nearest the centroid first

    @property
    def flagged(self) -> bool:
        return self.status == STATUS_FLAGGED

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tag": self.tag,
            "family": self.family,
            "size": self.size,
            "top_artist": self.top_artist,
            "share": self.top_artist_share,
            "status": self.status,
            "reason": self.reason,
            "examples": list(self.examples),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StyleCluster:
        return cls(
            id=int(data["id"]),
            tag=str(data.get("tag", "")),
            family=str(data.get("family", "")),
            size=int(data.get("size", 0)),
            top_artist=str(data.get("top_artist") or ""),
            top_artist_share=float(data.get("share", 0.0)),
            status=str(data.get("status", STATUS_OK)),
            reason=str(data.get("reason", "")),
            examples=[str(x) for x in data.get("examples", [])],
        )


@dataclass
class ClusterSet:
    """A versioned set of style clusters: centroid row i belongs to `clusters[i]` (whose id is i)."""

    version: str
    centroids: np.ndarray  # (clusters, dim) float32
    clusters: list[StyleCluster]
    k: int
    per_family: bool
    params: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    model_version: str = ""
    embeddings: int = 0

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def cluster(self, cluster_id: int) -> StyleCluster | None:
        return self.clusters[cluster_id] if 0 <= cluster_id < len(self.clusters) else None


def validate_tag_format(tag_format: str) -> None:
    """Raises ValueError unless the format has `{n}` and uses no placeholder but `{n}` and `{family}`."""
    if "{n}" not in tag_format:
        raise ValueError(f"style tag format {tag_format!r} must contain {{n}}")
    try:
        tag = tag_format.format(n=0, family="anime")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"style tag format {tag_format!r} is not usable: {exc}") from None
    if not re.fullmatch(r"[a-z0-9_]+", tag):
        raise ValueError(f"style tag format {tag_format!r} must give lower-case tags of a-z, 0-9 and _")


def _family_token(family: str) -> str:
    token = re.sub(r"[^a-z0-9]+", "_", family.lower()).strip("_")
    return token or "style"


def format_tag(tag_format: str, n: int, family: str) -> str:
    return tag_format.format(n=n, family=_family_token(family))


def _artist_key(artist: str | None) -> str:
    return " ".join((artist or "").replace("_", " ").lower().split())


def artist_stats(artists: list[str | None]) -> tuple[str, float]:
    """(top artist as first spelled, its share of all the images); images without an artist count for none."""
    if not artists:
        return "", 0.0
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for artist in artists:
        key = _artist_key(artist)
        if key:
            counts[key] += 1
            spelling.setdefault(key, str(artist))
    if not counts:
        return "", 0.0
    key, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return spelling[key], count / len(artists)


def kmeans_plus_plus(vectors: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared distance."""
    n = len(vectors)
    chosen = [int(rng.integers(n))]
    d2 = ((vectors - vectors[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(d2.sum())
        nxt = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        chosen.append(nxt)
        d2 = np.minimum(d2, ((vectors - vectors[nxt]) ** 2).sum(axis=1))
    return np.ascontiguousarray(vectors[chosen], dtype=np.float32)


def kmeans_labels(vectors: np.ndarray, k: int, seed: int, max_points: int = 0, restarts: int = 4) -> np.ndarray:
    """Labels in 0..k-1: faiss k-means from k-means++ seeds, best of `restarts` runs by inertia.

    Trained on at most `max_points` rows (a seeded sample); every row is assigned."""
    n, dim = vectors.shape
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train = np.ascontiguousarray(vectors, dtype=np.float32)
    if max_points and n > max_points:
        train = train[np.sort(rng.choice(n, size=max_points, replace=False))]
    seeding = train
    if len(train) > max(10_000, 20 * k):
        seeding = train[rng.choice(len(train), size=max(10_000, 20 * k), replace=False)]
    best: tuple[float, np.ndarray] | None = None
    for _ in range(restarts):
        km = faiss.Kmeans(
            dim,
            k,
            niter=50,
            seed=int(rng.integers(2**31 - 1)),
            verbose=False,
            min_points_per_centroid=1,
            max_points_per_centroid=max(256, len(train)),
        )
        km.train(train, init_centroids=kmeans_plus_plus(seeding, k, rng))
        inertia = float(km.obj[-1]) if len(km.obj) else float("inf")
        if best is None or inertia < best[0]:
            best = (inertia, km.centroids.copy())
    assert best is not None
    index = faiss.IndexFlatL2(dim)
    index.add(best[1])
    _, labels = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64)


@dataclass
class _Group:
    members: np.ndarray  # row indexes into the table
    family: str
    status: str = STATUS_OK
    reason: str = ""
    sibling: int = -1  # index in the final list of the other half of a split


def _groups(labels: np.ndarray, members: np.ndarray, image_ids: list[str]) -> list[np.ndarray]:
    """Non-empty groups of `members` by label, largest first (ties: smallest image id), for stable numbering."""
    groups = [members[labels == j] for j in np.unique(labels)]
    return sorted(groups, key=lambda g: (-len(g), min(image_ids[i] for i in g)))


def _guard(table: EmbeddingTable, group: _Group, limit: float, seed: int) -> list[_Group]:
    members = group.members
    artist, share = artist_stats([table.artists[i] for i in members])
    if share <= limit:
        return [group]
    over = f"artist {artist!r} holds {share:.2f} of {len(members)} images (limit {limit:.2f})"
    if len(members) >= MIN_SPLIT_SIZE:
        labels = kmeans_labels(table.vectors[members], 2, seed)
        parts = [_Group(g, group.family) for g in _groups(labels, members, table.image_ids)]
        verdicts = [artist_stats([table.artists[i] for i in p.members]) for p in parts]
        if len(parts) == 2 and any(s <= limit for _, s in verdicts):
            for part, (part_artist, part_share) in zip(parts, verdicts, strict=True):
                if part_share <= limit:
                    part.status = STATUS_SPLIT
                    part.reason = f"split off a cluster where {over}"
                else:
                    part.status = STATUS_FLAGGED
                    part.reason = (
                        f"artist {part_artist!r} holds {part_share:.2f} of {len(part.members)} images "
                        f"(limit {limit:.2f}) after splitting a cluster where {over}"
                    )
            return parts
        over += "; splitting it did not give a part under the limit"
    else:
        over += f"; too small to split (< {MIN_SPLIT_SIZE} images)"
    group.status = STATUS_FLAGGED
    group.reason = over
    return [group]


def fit_cluster_set(
    table: EmbeddingTable,
    *,
    k: int,
    per_family: bool,
    max_artist_share: float,
    seed: int = 0,
    tag_format: str = "style_cluster_{n}",
    max_points: int = 0,
    model: str = "",
    model_version: str = "",
) -> ClusterSet:
    """Clusters `table` (k per family, or k in all) and applies the artist guard; the version is a content hash."""
    if len(table) == 0:
        raise ValueError("no embeddings to cluster")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < max_artist_share <= 1.0:
        raise ValueError(f"max_artist_share must be in (0, 1], got {max_artist_share}")
    validate_tag_format(tag_format)
    families = sorted(set(table.families)) if per_family else [GLOBAL_FAMILY]
    final: list[_Group] = []
    for family in families:
        if per_family:
            members = np.array([i for i, f in enumerate(table.families) if f == family], dtype=np.int64)
        else:
            members = np.arange(len(table), dtype=np.int64)
        labels = kmeans_labels(table.vectors[members], k, seed, max_points)
        for group in _groups(labels, members, table.image_ids):
            parts = _guard(table, _Group(group, family), max_artist_share, seed)
            if len(parts) == 2:
                parts[0].sibling, parts[1].sibling = len(final) + 1, len(final)
            final.extend(parts)

    centroids = np.stack([table.vectors[g.members].mean(axis=0) for g in final]).astype(np.float32)
    clusters = []
    for n, (group, centre) in enumerate(zip(final, centroids, strict=True)):
        order = np.argsort(((table.vectors[group.members] - centre) ** 2).sum(axis=1), kind="stable")
        artist, share = artist_stats([table.artists[i] for i in group.members])
        reason = group.reason
        if group.sibling >= 0:
            reason += f"; the other part is cluster {group.sibling}"
        clusters.append(
            StyleCluster(
                id=n,
                tag="" if group.status == STATUS_FLAGGED else format_tag(tag_format, n, group.family),
                family=group.family,
                size=len(group.members),
                top_artist=artist,
                top_artist_share=round(share, 6),
                status=group.status,
                reason=reason,
                examples=[table.image_ids[int(group.members[i])] for i in order[:STORED_EXAMPLES]],
            )
        )
    params = {
        "k": k,
        "per_family": per_family,
        "max_artist_share": max_artist_share,
        "seed": seed,
        "tag_format": tag_format,
        "max_points": max_points,
        "embeddings": len(table),
    }
    digest = hashlib.sha256(centroids.tobytes())
    digest.update(json.dumps([params, model, model_version, [c.to_dict() for c in clusters]]).encode())
    return ClusterSet(
        version="cs_" + digest.hexdigest()[:12],
        centroids=centroids,
        clusters=clusters,
        k=k,
        per_family=per_family,
        params=params,
        model=model,
        model_version=model_version,
        embeddings=len(table),
    )
