"""One image's curation results joined from the catalog (captions, score, style, safety), for export and report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from pony_common.catalog.db import Catalog
from pony_common.catalog.models import (
    AestheticScoreRow,
    CaptionRow,
    ImageRow,
    SafetyDecisionRow,
    StyleAssignmentRow,
    StyleClusterSetRow,
)

_CHUNK = 500


@dataclass
class ImageRecord:
    image_id: str
    blob_key: str
    width: int
    height: int
    format: str
    category: str
    status: str
    error: str | None
    tags: list[str]
    characters: list[str]
    artist: str | None
    source_site: str | None
    source_uri: str | None
    dup_group: str | None
    is_duplicate: bool
    captions: dict[str, str] = field(default_factory=dict)
    score: float | None = None
    score_tag: str | None = None
    style_tag: str | None = None
    style_cluster: int | None = None
    style_version: str | None = None
    palette_tags: list[str] = field(default_factory=list)
    rating: str | None = None
    decision: str | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return self.decision == "block"


def active_style_version(catalog: Catalog) -> str | None:
    """The active style cluster set's version (the newest active one), or None."""
    with catalog.session() as s:
        return s.scalars(
            select(StyleClusterSetRow.version)
            .where(StyleClusterSetRow.active.is_(True))
            .order_by(StyleClusterSetRow.created_at.desc())
            .limit(1)
        ).first()


def load_records(catalog: Catalog, image_ids: Sequence[str] | None = None) -> list[ImageRecord]:
    """Records of `image_ids` in that order (missing ids are left out), or of every image sorted by id."""
    with catalog.session() as s:
        if image_ids is None:
            image_ids = list(s.scalars(select(ImageRow.id).order_by(ImageRow.id)))
    version = active_style_version(catalog)
    found: dict[str, ImageRecord] = {}
    for i in range(0, len(image_ids), _CHUNK):
        chunk = list(image_ids[i : i + _CHUNK])
        with catalog.session() as s:
            for r in s.scalars(select(ImageRow).where(ImageRow.id.in_(chunk))):
                found[r.id] = ImageRecord(
                    image_id=r.id,
                    blob_key=r.blob_key,
                    width=r.width or 0,
                    height=r.height or 0,
                    format=r.format or "",
                    category=r.category or "other",
                    status=r.status,
                    error=r.error,
                    tags=list(r.tags or []),
                    characters=list(r.characters or []),
                    artist=r.artist,
                    source_site=r.source_site,
                    source_uri=r.source_uri,
                    dup_group=r.dup_group,
                    is_duplicate=bool(r.is_duplicate),
                )
            for c in s.scalars(select(CaptionRow).where(CaptionRow.image_id.in_(chunk))):
                found[c.image_id].captions[c.kind] = c.text
            for sc in s.scalars(select(AestheticScoreRow).where(AestheticScoreRow.image_id.in_(chunk))):
                found[sc.image_id].score = sc.score
                found[sc.image_id].score_tag = sc.score_tag
            if version is not None:
                query = select(StyleAssignmentRow).where(
                    StyleAssignmentRow.image_id.in_(chunk), StyleAssignmentRow.cluster_set_version == version
                )
                for a in s.scalars(query):
                    rec = found[a.image_id]
                    rec.style_tag = a.tag or None
                    rec.style_cluster = a.cluster_id
                    rec.style_version = a.cluster_set_version
                    rec.palette_tags = list(a.palette_tags or [])
            for d in s.scalars(select(SafetyDecisionRow).where(SafetyDecisionRow.image_id.in_(chunk))):
                rec = found[d.image_id]
                rec.rating = d.rating
                rec.decision = d.decision
                rec.reasons = list(d.reasons or [])
    return [found[i] for i in image_ids if i in found]
