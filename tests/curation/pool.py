"""Catalog rows for curation tests that do not need the services: processed images with scores and decisions."""

from __future__ import annotations

import hashlib

from pony_common.catalog.db import Catalog, upsert
from pony_common.catalog.models import AestheticScoreRow, ImageRow, SafetyDecisionRow


def fake_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def add_processed(
    catalog: Catalog,
    name: str,
    category: str,
    score: float,
    *,
    decision: str = "allow",
    status: str = "done",
    phash: str | None = None,
) -> str:
    """One image as the workflow leaves it: the images row, its score and its safety decision."""
    image_id = fake_id(name)
    with catalog.session() as s:
        upsert(
            s,
            ImageRow,
            {
                "id": image_id,
                "blob_key": f"images/{image_id[:2]}/{image_id}.png",
                "category": category,
                "tags": [],
                "characters": [],
                "status": status,
                "phash": phash,
                "width": 8,
                "height": 8,
            },
            keys=("id",),
        )
        upsert(
            s,
            AestheticScoreRow,
            {
                "image_id": image_id,
                "raw": score * 10,
                "score": score,
                "score_tag": f"score_{min(9, int(score * 10))}",
                "model": "m",
                "model_version": "1",
                "head_version": "h",
            },
            keys=("image_id",),
        )
        upsert(
            s,
            SafetyDecisionRow,
            {"image_id": image_id, "rating": "safe", "decision": decision, "model": "m", "model_version": "1"},
            keys=("image_id",),
        )
    return image_id
