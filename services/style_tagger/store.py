"""The style tagger's catalog reads and writes: style embeddings, versioned cluster sets, style assignments."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import case, select, update

from pony_common.catalog.db import Catalog, upsert
from pony_common.catalog.models import EmbeddingRow, ImageRow, StyleAssignmentRow, StyleClusterSetRow
from services.style_tagger.clusters import ClusterSet, EmbeddingTable, StyleCluster

EMBEDDING_KIND = "style"


def vector_bytes(vector: np.ndarray) -> bytes:
    """float32 little-endian bytes, the catalog's embedding encoding."""
    return np.asarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes, dim: int) -> np.ndarray:
    vec = np.frombuffer(data, dtype="<f4")
    if vec.shape[0] != dim:
        raise ValueError(f"stored vector has {vec.shape[0]} values, its row says dim {dim}")
    return vec.astype(np.float32)


@dataclass(frozen=True)
class StyleAssignment:
    """One image's style tag under one cluster set (what Tag returns, as a catalog row)."""

    image_id: str
    cluster_set_version: str
    cluster_id: int
    tag: str
    distance: float
    palette_tags: tuple[str, ...] = ()


class StyleStore:
    """Reads and writes the style tables of one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def save_embeddings(self, items: Iterable[tuple[str, np.ndarray]], model: str, model_version: str) -> int:
        """Upserts `(image_id, vector)` as kind "style" (the images must be in the catalog). Returns the count."""
        rows = [
            {
                "image_id": image_id,
                "kind": EMBEDDING_KIND,
                "dim": int(np.asarray(vec).shape[-1]),
                "vector": vector_bytes(vec),
                "model": model,
                "model_version": model_version,
            }
            for image_id, vec in items
        ]
        with self.catalog.session() as s:
            upsert(s, EmbeddingRow, rows, keys=["image_id", "kind"])
        return len(rows)

    def load_embeddings(
        self, model_version: str | None = None, dim: int | None = None, kinds: Sequence[str] = (EMBEDDING_KIND,)
    ) -> EmbeddingTable:
        """Style embeddings (of `model_version` and `dim` when given) with each image's artist and category; with
        several `kinds`, one row per image (the first kind listed that it has)."""
        stmt = (
            select(EmbeddingRow.image_id, EmbeddingRow.dim, EmbeddingRow.vector, ImageRow.artist, ImageRow.category)
            .join(ImageRow, ImageRow.id == EmbeddingRow.image_id)
            .where(EmbeddingRow.kind.in_(list(kinds)))
            .order_by(EmbeddingRow.image_id, case({k: i for i, k in enumerate(kinds)}, value=EmbeddingRow.kind))
        )
        if model_version is not None:
            stmt = stmt.where(EmbeddingRow.model_version == model_version)
        if dim is not None:
            stmt = stmt.where(EmbeddingRow.dim == dim)
        ids: list[str] = []
        vectors: list[np.ndarray] = []
        artists: list[str | None] = []
        families: list[str] = []
        with self.catalog.session() as s:
            for image_id, row_dim, data, artist, category in s.execute(stmt).yield_per(4096):
                if ids and ids[-1] == image_id:
                    continue  # the same image under a later kind
                ids.append(image_id)
                vectors.append(vector_from_bytes(data, row_dim))
                artists.append(artist)
                families.append(category or "other")
        width = dim or (vectors[0].shape[0] if vectors else 0)
        matrix = np.stack(vectors) if vectors else np.zeros((0, width), dtype=np.float32)
        return EmbeddingTable(ids, matrix, artists, families)

    def save_cluster_set(self, cluster_set: ClusterSet, activate: bool) -> None:
        """Writes the set (idempotent on its version); `activate` makes it the only active set."""
        values = {
            "version": cluster_set.version,
            "k": cluster_set.k,
            "per_family": cluster_set.per_family,
            "dim": cluster_set.dim,
            "centroids": vector_bytes(cluster_set.centroids),
            "clusters": [c.to_dict() for c in cluster_set.clusters],
            "params": cluster_set.params,
            "model": cluster_set.model,
            "model_version": cluster_set.model_version,
            "active": False,
        }
        with self.catalog.session() as s:
            upsert(s, StyleClusterSetRow, values, keys=["version"], update=[k for k in values if k != "active"])
            if activate:
                s.execute(update(StyleClusterSetRow).where(StyleClusterSetRow.active).values(active=False))
                s.execute(
                    update(StyleClusterSetRow)
                    .where(StyleClusterSetRow.version == cluster_set.version)
                    .values(active=True)
                )

    def active_version(self) -> str | None:
        with self.catalog.session() as s:
            return s.scalars(
                select(StyleClusterSetRow.version)
                .where(StyleClusterSetRow.active)
                .order_by(StyleClusterSetRow.created_at.desc())
                .limit(1)
            ).first()

    def load_cluster_set(self, version: str) -> ClusterSet | None:
        with self.catalog.session() as s:
            row = s.get(StyleClusterSetRow, version)
            if row is None:
                return None
            centroids = np.frombuffer(row.centroids, dtype="<f4").astype(np.float32).reshape(-1, row.dim)
            return ClusterSet(
                version=row.version,
                centroids=centroids,
                clusters=[StyleCluster.from_dict(c) for c in row.clusters],
                k=row.k,
                per_family=row.per_family,
                params=dict(row.params or {}),
                model=row.model,
                model_version=row.model_version,
                embeddings=int((row.params or {}).get("embeddings", 0)),
            )

    def save_assignments(self, assignments: Sequence[StyleAssignment]) -> int:
        """Upserts style assignments keyed by (image, cluster set version). Returns the count."""
        rows = [
            {
                "image_id": a.image_id,
                "cluster_set_version": a.cluster_set_version,
                "cluster_id": a.cluster_id,
                "tag": a.tag,
                "distance": float(a.distance),
                "palette_tags": list(a.palette_tags),
            }
            for a in assignments
        ]
        with self.catalog.session() as s:
            upsert(s, StyleAssignmentRow, rows, keys=["image_id", "cluster_set_version"])
        return len(rows)

    def latest_palette_tags(self, image_ids: Sequence[str], chunk: int = 900) -> dict[str, tuple[str, ...]]:
        """Each image's palette tags from its latest style assignment that has any (images without: absent)."""
        out: dict[str, tuple[str, ...]] = {}
        newest: dict[str, object] = {}
        with self.catalog.session() as s:
            for start in range(0, len(image_ids), chunk):
                stmt = select(
                    StyleAssignmentRow.image_id, StyleAssignmentRow.palette_tags, StyleAssignmentRow.created_at
                ).where(StyleAssignmentRow.image_id.in_(list(image_ids[start : start + chunk])))
                for image_id, tags, created in s.execute(stmt):
                    if tags and (image_id not in newest or created > newest[image_id]):
                        newest[image_id] = created
                        out[image_id] = tuple(tags)
        return out
