"""Semantic near-duplicates on the stored CLIP embeddings (as NeMo Curator does): pairs whose cosine distance is at
most a threshold, found by a faiss inner-product range search, within k-means clusters when the pool is large."""

from __future__ import annotations

import logging
import math

import numpy as np
from sqlalchemy import select

from pony_common.catalog.db import Catalog
from pony_common.catalog.models import EmbeddingRow
from pony_common.errors import InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.05  # cosine distance: near-identical content (re-crops, re-colours, watermarks)
# Up to this many embeddings every pair is searched exactly; above it, pairs are searched within k-means clusters
# (a pair split across two clusters is missed, as in NeMo Curator's semantic dedup).
EXACT_LIMIT = 50_000
_QUERY_CHUNK = 4096


def load_embeddings(catalog: Catalog, kind: str = "clip") -> tuple[list[str], np.ndarray]:
    """The stored embeddings of `kind` (ids, float32 rows normalised to unit length); rows whose length differs
    from the most common one are left out."""
    with catalog.session() as s:
        rows = s.execute(select(EmbeddingRow.image_id, EmbeddingRow.vector).where(EmbeddingRow.kind == kind)).all()
    if not rows:
        return [], np.zeros((0, 0), dtype=np.float32)
    sizes = [len(r.vector) for r in rows]
    size = max(set(sizes), key=sizes.count)
    kept = [r for r in rows if len(r.vector) == size and size % 4 == 0]
    if len(kept) < len(rows):
        log.warning("embeddings of another size left out", extra={"kind": kind, "left_out": len(rows) - len(kept)})
    vectors = np.frombuffer(b"".join(r.vector for r in kept), dtype="<f4").reshape(len(kept), size // 4)
    return [r.image_id for r in kept], normalised(vectors)


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def close_pairs(
    vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *, exact_limit: int = EXACT_LIMIT
) -> list[tuple[int, int]]:
    """Index pairs (i < j) of unit `vectors` whose cosine distance (1 - cosine similarity) is at most `threshold`."""
    if not 0.0 < threshold <= 1.0:
        raise InvalidArgument("threshold", f"cosine distance threshold must be in (0, 1], got {threshold:g}")
    n = len(vectors)
    if n < 2:
        return []
    if n <= exact_limit:
        return _range_pairs(vectors, np.arange(n), threshold)
    import faiss

    clusters = max(2, int(math.sqrt(n)))
    kmeans = faiss.Kmeans(vectors.shape[1], clusters, niter=10, seed=1234, spherical=True, verbose=False)
    kmeans.train(vectors)
    _, assignment = kmeans.index.search(vectors, 1)
    assignment = assignment.reshape(-1)
    pairs: list[tuple[int, int]] = []
    for cluster in np.unique(assignment).tolist():
        members = np.flatnonzero(assignment == cluster)
        if len(members) > 1:
            pairs += _range_pairs(vectors[members], members, threshold)
    return pairs


def _range_pairs(vectors: np.ndarray, positions: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs among `vectors` within the threshold, as positions."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # faiss returns inner products strictly above the radius: nudge it so that a distance equal to the threshold
    # counts (the float32 products carry this much rounding anyway).
    radius = float(1.0 - threshold) - 1e-6
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(vectors), _QUERY_CHUNK):
        lims, _, found = index.range_search(vectors[start : start + _QUERY_CHUNK], radius)
        for q in range(len(lims) - 1):
            i = start + q
            pairs += [(int(positions[i]), int(positions[j])) for j in found[lims[q] : lims[q + 1]] if j > i]
    return pairs


def semantic_pairs(
    catalog: Catalog, threshold: float = DEFAULT_THRESHOLD, *, kind: str = "clip"
) -> list[tuple[str, str]]:
    """Image id pairs whose stored `kind` embeddings are within `threshold` cosine distance."""
    ids, vectors = load_embeddings(catalog, kind)
    return [(ids[i], ids[j]) for i, j in close_pairs(vectors, threshold)]
