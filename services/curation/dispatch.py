"""Sending images through the curation workflow and following them to the end (with a progress bar)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from sqlalchemy import func, select

from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings

log = logging.getLogger(__name__)

FINAL = ("done", "failed")
_CHUNK = 500


def submit_images(settings: Settings, image_ids: Sequence[str]) -> list[str]:
    """Publishes one workflow per image on the configured broker; returns the ids of the workflows."""
    from pony_common.celery_app import configure_app
    from services.curation.tasks import workflow

    configure_app(settings)
    ids = [workflow(image_id).apply_async().id for image_id in image_ids]
    log.info("submitted images", extra={"count": len(ids)})
    return ids


def image_statuses(settings: Settings, image_ids: Sequence[str]) -> dict[str, int]:
    """Count of the given images per status."""
    catalog = catalog_for(settings.database_url)
    counts: dict[str, int] = {}
    with catalog.session() as s:
        for i in range(0, len(image_ids), _CHUNK):
            chunk = list(image_ids[i : i + _CHUNK])
            query = select(ImageRow.status, func.count()).where(ImageRow.id.in_(chunk)).group_by(ImageRow.status)
            for status, n in s.execute(query):
                counts[status] = counts.get(status, 0) + n
    return counts


def wait_for_images(
    settings: Settings,
    image_ids: Sequence[str],
    *,
    progress: bool = True,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
) -> dict[str, int]:
    """Polls the catalog until every image is `done` or `failed` (or the timeout passes); returns the counts."""
    from tqdm import tqdm

    ids = list(dict.fromkeys(image_ids))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with tqdm(total=len(ids), desc="curate", unit="img", disable=not progress) as bar:
        while True:
            counts = image_statuses(settings, ids)
            finished = sum(counts.get(s, 0) for s in FINAL)
            bar.update(finished - bar.n)
            bar.set_postfix(done=counts.get("done", 0), failed=counts.get("failed", 0), refresh=False)
            if finished >= len(ids):
                return counts
            if deadline is not None and time.monotonic() > deadline:
                log.warning("stopped waiting", extra={"finished": finished, "total": len(ids)})
                return counts
            time.sleep(poll_s)
