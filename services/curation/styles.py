"""Style clusters for the pool: fit a cluster set when there is none (the first ingest) and tag the STORED CLIP
embeddings with it in the same call (no image tower, no second pass over the pool; palette tags the workflow stored
are carried over), then tag whatever processed image is still untagged (one without a stored embedding). The
batch workflow tags new images once a set exists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select

from pony.v1 import style_tagger_pb2
from pony_common.catalog.db import Catalog, catalog_for
from pony_common.catalog.models import EmbeddingRow, ImageRow, StyleAssignmentRow
from pony_common.config import Settings
from services.curation.records import active_style_version
from services.curation.rpc import ItemFailed, call
from services.curation.tasks import CLIP_KIND, STYLE_KIND, image_ref, save_style_embedding, save_style_tags
from services.style_tagger.client import StyleTaggerClient

log = logging.getLogger(__name__)

BATCH = 32


@dataclass
class StyleAssignment:
    cluster_set_version: str | None = None
    fitted: bool = False
    clusters: int = 0
    tagged: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def _untagged(catalog: Catalog, version: str, image_ids: Sequence[str] | None) -> list[str]:
    tagged = select(StyleAssignmentRow.image_id).where(StyleAssignmentRow.cluster_set_version == version)
    query = (
        select(ImageRow.id)
        .where(ImageRow.status.in_(("done", "processing")), ImageRow.phash.is_not(None), ImageRow.id.not_in(tagged))
        .order_by(ImageRow.id)
    )
    with catalog.session() as s:
        ids = list(s.scalars(query))
    if image_ids is not None:
        wanted = set(image_ids)
        ids = [i for i in ids if i in wanted]
    return ids


def assign_styles(
    settings: Settings, image_ids: Sequence[str] | None = None, *, refit: bool = False, seed: int = 0
) -> StyleAssignment:
    """Fits and activates a style cluster set when none is active (or `refit`) from the stored style embeddings,
    then tags the processed images (of `image_ids`, default all) that have no tag under the active set."""
    catalog = catalog_for(settings.database_url)
    client = StyleTaggerClient(settings)
    out = StyleAssignment(cluster_set_version=active_style_version(catalog))
    if out.cluster_set_version is None or refit:
        with catalog.session() as s:
            n = (
                s.scalar(
                    select(func.count()).select_from(EmbeddingRow).where(EmbeddingRow.kind.in_((CLIP_KIND, STYLE_KIND)))
                )
                or 0
            )
        if n < 2:
            log.info("too few style embeddings to cluster", extra={"embeddings": n})
            return out
        k = min(settings.style_tagger.k, max(2, n // 6))
        resp = call(
            client.fit_clusters, style_tagger_pb2.FitClustersRequest(k=k, seed=seed, activate=True, assign=True)
        )
        out.cluster_set_version, out.fitted, out.clusters = resp.cluster_set_version, True, resp.clusters
        out.tagged += resp.assigned
        log.info(
            "fitted style clusters",
            extra={"version": resp.cluster_set_version, "clusters": resp.clusters, "assigned": resp.assigned},
        )
    todo = _untagged(catalog, out.cluster_set_version, image_ids)
    by_id: dict[str, ImageRow] = {}
    with catalog.session() as s:
        for i in range(0, len(todo), 500):
            by_id.update({r.id: r for r in s.scalars(select(ImageRow).where(ImageRow.id.in_(todo[i : i + 500])))})
    for start in range(0, len(todo), BATCH):
        refs, ids = [], []
        for image_id in todo[start : start + BATCH]:
            try:
                refs.append(image_ref(settings, by_id[image_id]))
                ids.append(image_id)
            except ItemFailed as exc:
                out.failed[image_id] = str(exc)
        if not refs:
            continue
        resp = call(client.tag, style_tagger_pb2.TagRequest(images=refs, include_embedding=True))
        good = []
        for image_id, tag in zip(ids, resp.results, strict=True):
            if tag.error.reason or tag.error.message:
                out.failed[image_id] = f"{tag.error.reason}: {tag.error.message}"
                continue
            tag.image_id = tag.image_id or image_id
            if tag.embedding:
                save_style_embedding(catalog, image_id, tag.embedding, resp.provenance)
            good.append(tag)
        out.tagged += save_style_tags(catalog, good)
    return out
