"""Vector search over a cluster set's centroids, behind one interface; the backend is config (`style_index`).

`faiss` (exact L2 search in memory) is implemented. `pgvector` is part of the interface but has no
backend in this build: the PostgreSQL this was developed against has no `vector` extension, so there was
nothing real to implement or test it on. Asking for it fails at load with a message saying so.
"""

from __future__ import annotations

from typing import Protocol

import faiss
import numpy as np

from pony_common.config import ConfigError

INDEX_KINDS = ("faiss", "pgvector")


class StyleIndex(Protocol):
    """Nearest centroids: `search` returns (L2 distances, centroid row numbers), each (queries, k), nearest first.

    Rows past the number of vectors are -1 with an infinite distance.
    """

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...


class FaissStyleIndex:
    """Exact L2 search (faiss `IndexFlatL2`) over the vectors given, keyed by the ids given."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError("vectors must be 2-D")
        self.dim = int(vectors.shape[1])
        self.ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        self._index = faiss.IndexFlatL2(self.dim)
        if len(vectors):
            self._index.add(vectors)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, the index has {self.dim}")
        found = min(k, len(self))
        distances = np.full((len(queries), k), np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        if found > 0:
            d2, idx = self._index.search(queries, found)
            distances[:, :found] = np.sqrt(np.maximum(d2, 0.0))
            rows[:, :found] = np.where(idx >= 0, self.ids[np.maximum(idx, 0)], -1)
        return distances, rows


def check_index_kind(kind: str) -> None:
    """Raises ConfigError for an unknown kind or one without a backend in this build."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"PONY_STYLE_INDEX={kind!r}: choose one of {', '.join(INDEX_KINDS)}")
    if kind == "pgvector":
        raise ConfigError(
            "PONY_STYLE_INDEX=pgvector: no pgvector backend in this build (the PostgreSQL it was built "
            "against lacks the vector extension); use faiss"
        )


def create_index(kind: str, vectors: np.ndarray, ids: np.ndarray | None = None) -> StyleIndex:
    """The configured index over `vectors` (row i has id `ids[i]`, default i)."""
    check_index_kind(kind)
    return FaissStyleIndex(vectors, ids)
