"""Ingest: store a source's images by content hash (blob store + images table), group near-duplicates,
send the unfinished images through the curation workflow in batches and, optionally, wait for them with a progress
bar.

Running it again on the same source finishes what an earlier run left: images never sent and images sent but
not finished (whatever stage they stopped in) are sent again; the stage ledger makes the resend harmless."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from PIL import Image
from sqlalchemy import select

from pony_common.blobs import BlobStore, image_key
from pony_common.catalog.db import Catalog, catalog_for, upsert
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.images import decode_image, image_id
from services.curation.categories import category_of
from services.curation.duplicates import DEFAULT_MAX_DISTANCE, dedup_new, resolve_duplicates
from services.curation.phash import phash
from services.curation.sources import SourceItem, iter_source
from services.curation.store import fail_stage

log = logging.getLogger(__name__)

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


@dataclass
class StoredImage:
    """Where one source item went: its content-hash id, whether this ingest created it, its status."""

    image_id: str
    uri: str
    new: bool
    status: str
    error: str | None = None


@dataclass
class IngestSummary:
    images: list[StoredImage] = field(default_factory=list)
    # Items whose bytes could not be read at all (no content hash): uri -> reason.
    unreadable: dict[str, str] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    finished: dict[str, int] = field(default_factory=dict)
    styles: dict[str, object] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        """Distinct image ids of this source, in source order."""
        return list(dict.fromkeys(i.image_id for i in self.images))

    @property
    def new(self) -> int:
        return sum(i.new for i in self.images)

    @property
    def failed(self) -> list[StoredImage]:
        return [i for i in self.images if i.status == "failed"]

    def as_dict(self) -> dict[str, object]:
        return {
            "items": len(self.images) + len(self.unreadable),
            "images": len(self.ids),
            "new": self.new,
            "existing": len(self.images) - self.new,
            "invalid": len({i.image_id for i in self.failed if i.new}),
            "unreadable": len(self.unreadable),
            "submitted": len(self.submitted),
            **({"finished": self.finished} if self.finished else {}),
            **({"styles": self.styles} if self.styles else {}),
        }


def store_item(settings: Settings, catalog: Catalog, blobs: BlobStore, item: SourceItem) -> StoredImage:
    """Stores one image under `images/ab/<sha256>.<ext>` and inserts its row unless it exists (a re-ingest adds
    nothing). Bytes that do not decode are kept and the row is `failed` with the reason."""
    digest = image_id(item.data)
    with catalog.session() as s:
        existing = s.get(ImageRow, digest)
        if existing is not None:
            return StoredImage(digest, item.uri, False, existing.status, existing.error)
    values: dict[str, object] = {
        "id": digest,
        "source_uri": item.uri,
        "source_site": item.source_site,
        "artist": item.artist,
        "category": category_of(item.category, item.tags),
        "tags": item.tags,
        "characters": item.characters,
        "status": "ingested",
    }
    error = None
    try:
        img = decode_image(
            item.data, field="image", formats=settings.image_formats, max_pixels=settings.max_image_pixels
        )
        fmt = Image.open(io.BytesIO(item.data)).format or "PNG"
        values.update(width=img.width, height=img.height, format=fmt, phash=phash(img))
        ext = _EXTENSIONS.get(fmt, "img")
    except InvalidArgument as exc:
        error = f"invalid_image: {exc.message}"
        values.update(status="failed", error=error)
        ext = "bin"
    key = image_key(digest, ext)
    blobs.put_if_absent(key, item.data)
    values["blob_key"] = key
    with catalog.session() as s:
        upsert(s, ImageRow, values, keys=("id",), update=())
    if error is not None:
        fail_stage(catalog, digest, "decode", error)
        log.warning("image failed to decode", extra={"image_id": digest, "uri": item.uri, "error": error})
    return StoredImage(digest, item.uri, True, str(values["status"]), error)


def store_items(settings: Settings, items: Iterable[SourceItem], *, progress: bool = False) -> IngestSummary:
    """Stores every item; returns what happened to each."""
    from tqdm import tqdm

    catalog = catalog_for(settings.database_url)
    blobs = BlobStore(settings.blob_url)
    summary = IngestSummary()
    for item in tqdm(items, desc="store", unit="img", disable=not progress):
        if item.error is not None:
            summary.unreadable[item.uri] = item.error
            log.warning("unreadable source item", extra={"uri": item.uri, "error": summary.unreadable[item.uri]})
            continue
        summary.images.append(store_item(settings, catalog, blobs, item))
    return summary


def pending_ids(catalog: Catalog, ids: Iterable[str], *, resume: bool) -> list[str]:
    """Of `ids`, the images to send through the workflow: every unfinished one (never sent: `ingested`; sent but
    not finished: `processing`, wherever it stopped), and with `resume` also those failed in a workflow stage."""
    wanted = list(dict.fromkeys(ids))
    statuses = ("ingested", "processing")
    with catalog.session() as s:
        rows = set(s.scalars(select(ImageRow.id).where(ImageRow.id.in_(wanted), ImageRow.status.in_(statuses))))
        if resume:
            # A failed decode stays failed: the bytes will not change.
            rows |= set(
                s.scalars(
                    select(ImageRow.id).where(
                        ImageRow.id.in_(wanted), ImageRow.status == "failed", ImageRow.phash.is_not(None)
                    )
                )
            )
    return [i for i in wanted if i in rows]


def ingest_source(
    settings: Settings,
    source: str,
    *,
    wait: bool = True,
    progress: bool = True,
    timeout_s: float | None = None,
    resume: bool = False,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    refit_styles: bool = False,
) -> IngestSummary:
    """`ponyctl ingest`: stores the source, groups near-duplicates, sends its unfinished images (with `resume`
    also its failed ones) through the workflow and (with `wait`) follows them to the end with a progress bar, then
    gives the pool style tags (fitting the style clusters when there are none yet, or with `refit_styles`).
    Needs a broker, workers and the services: BrokerUnavailable when the broker is down (nothing unsent is marked
    in flight), NoWorker when nothing progresses and a queue has no worker (the images stay queued)."""
    from services.curation.dispatch import submit_images, wait_for_images

    catalog = catalog_for(settings.database_url)
    summary = store_items(settings, iter_source(source, settings), progress=progress)
    dedup_new(catalog, max_distance)
    todo = pending_ids(catalog, summary.ids, resume=resume)
    summary.submitted = submit_images(settings, todo)
    if wait and todo:
        summary.finished = wait_for_images(settings, todo, progress=progress, timeout_s=timeout_s)
        resolve_duplicates(catalog)
    if wait and (todo or refit_styles):
        summary.styles = _assign_styles(settings, refit_styles)
    log.info("ingested", extra={"source": source, **summary.as_dict()})
    return summary


def _assign_styles(settings: Settings, refit: bool) -> dict[str, object]:
    """Style tags for the pool after a batch; a style tagger that cannot be reached is reported, not fatal."""
    import grpc

    from services.curation.rpc import ItemFailed
    from services.curation.styles import assign_styles

    try:
        out = assign_styles(settings, refit=refit)
    except (grpc.RpcError, ItemFailed) as exc:
        log.warning("style clustering skipped", extra={"error": str(exc)})
        return {"error": str(exc).splitlines()[0]}
    return {
        "cluster_set": out.cluster_set_version,
        "fitted": out.fitted,
        "tagged": out.tagged,
        "failed": len(out.failed),
    }
