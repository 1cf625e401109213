"""Embeddings a caller passes in (one CLIP pass shared by score, style and safety): checked against the width the
receiving model takes, with errors naming the request field of the bad one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pony_common.errors import InvalidArgument


def check_embedding(values: Sequence[float], width: int, field: str) -> np.ndarray:
    """`values` as a float32 row of `width` values; InvalidArgument(field) for another width, a non-finite value or
    an all-zero vector."""
    if len(values) != width:
        raise InvalidArgument(field, f"has {len(values)} values; this model takes {width}-d embeddings")
    row = np.asarray(values, dtype=np.float32)
    if not np.isfinite(row).all():
        raise InvalidArgument(field, "has non-finite values")
    if not np.any(row):
        raise InvalidArgument(field, "is all zeros")
    return row


def check_embeddings(vectors: Sequence[Sequence[float]], width: int, field: str) -> np.ndarray:
    """(n, width) float32 rows; the bad one's error names `field[i]`."""
    rows = np.zeros((len(vectors), width), dtype=np.float32)
    for i, values in enumerate(vectors):
        rows[i] = check_embedding(values, width, f"{field}[{i}]")
    return rows


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (what the CLIP tower returns; a passed vector may have drifted in transit)."""
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
