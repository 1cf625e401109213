"""Synthetic style embeddings with known structure (blobs, artists, families) and catalog rows for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pony_common.catalog.db import Catalog, upsert
from pony_common.catalog.models import ImageRow
from services.style_tagger.clusters import EmbeddingTable

DIM = 64  # the tiny CLIP's projection width


@dataclass
class Blob:
    size: int
    artists: Sequence[str]  # cycled over the blob's points
    family: str = "anime"
    offset: np.ndarray | None = None  # centre; random unit vector when None


def make_table(blobs: Sequence[Blob], *, noise: float = 0.02, seed: int = 0) -> tuple[EmbeddingTable, np.ndarray]:
    """An EmbeddingTable of Gaussian blobs and the true blob index of each row."""
    rng = np.random.default_rng(seed)
    ids, vectors, artists, families, truth = [], [], [], [], []
    for b, blob in enumerate(blobs):
        centre = blob.offset if blob.offset is not None else rng.normal(size=DIM)
        if blob.offset is None:
            centre = centre / np.linalg.norm(centre)
        for i in range(blob.size):
            ids.append(f"{b:02d}{i:04d}".ljust(64, "0"))
            vectors.append(centre + rng.normal(scale=noise, size=DIM))
            artists.append(blob.artists[i % len(blob.artists)])
            families.append(blob.family)
            truth.append(b)
    table = EmbeddingTable(ids, np.array(vectors, dtype=np.float32), artists, families)
    return table, np.array(truth)


def add_images(catalog: Catalog, table: EmbeddingTable) -> None:
    """Catalog rows for the table's images (artist and category), so embeddings can reference them."""
    rows = [
        {"id": i, "blob_key": f"images/{i[:2]}/{i}.png", "artist": a, "category": f}
        for i, a, f in zip(table.image_ids, table.artists, table.families, strict=True)
    ]
    with catalog.session() as s:
        upsert(s, ImageRow, rows, keys=["id"])
