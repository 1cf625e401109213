"""Sending images through the curation workflow and following them to the end (with a progress bar).

The unit of work is a batch of `curation_batch_size` images: one workflow (one task per stage) per batch. An image
is `processing` only while its batch's workflow is published: a batch is marked and published together, and a batch
that could not be published gets its previous status back, so a broker that is down leaves nothing in flight that
is not. An image cut off between the two (the process killed) is resent by the next `ponyctl ingest` of its
source, which sends every image that has not finished. Following the images, a wait with no progress at all while
some curation queue has no worker ends with a NoWorker error instead of waiting forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update

from pony_common.catalog.db import Catalog, catalog_for, id_in
from pony_common.catalog.models import ImageRow
from pony_common.config import ConfigError, Settings
from pony_common.errors import DependencyUnavailable, PonyError
from pony_common.workers import CURATION_QUEUES
from services.curation.store import StageRow

log = logging.getLogger(__name__)

FINAL = ("done", "failed")
# Largest batch: the services' default per-call caps (captioner max_items, style tagger and safety max_batch).
MAX_BATCH = 256
_CHUNK = 500


class BrokerUnavailable(DependencyUnavailable):
    """The broker cannot be reached: nothing more is sent and the unsent images keep their status."""


class NoWorker(PonyError):
    """Nothing made progress and some curation queue has no worker: the images wait in the queues."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _broker_error(settings: Settings, exc: BaseException, sent: int, total: int) -> BrokerUnavailable:
    from kombu.utils.url import maybe_sanitize_url

    url = maybe_sanitize_url(settings.broker_url)
    done = f"{sent} of {total} images were sent, " if sent else ""
    return BrokerUnavailable(
        f"cannot reach the broker at {url} ({_one_line(exc)}): start it or set PONY_BROKER_URL to a running one; "
        f"{done}the rest keep their status and the next `ponyctl ingest` of this source sends them"
    )


def _is_broker_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError

    return isinstance(exc, OperationalError | ConnectionError | OSError)


def check_broker(settings: Settings) -> None:
    """Connects to the configured broker once (a few quick tries); BrokerUnavailable when it cannot."""
    from pony_common.celery_app import app, configure_app

    configure_app(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.2, interval_max=0.5)
    except Exception as exc:
        if not _is_broker_error(exc):
            raise
        raise _broker_error(settings, exc, 0, 0) from None


def _mark_in_flight(catalog: Catalog, ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """Marks `ids` processing and reopens their failed workflow stages (a stale persist then waits for them);
    returns each image's previous (status, error)."""
    images, stages = ImageRow.__table__.c, StageRow.__table__.c
    with catalog.session() as s:
        before = {
            r.id: (r.status, r.error)
            for r in s.execute(select(images.id, images.status, images.error).where(id_in(s, images.id, ids)))
        }
        s.execute(update(ImageRow.__table__).where(id_in(s, images.id, ids)).values(status="processing", error=None))
        s.execute(
            update(StageRow.__table__)
            .where(id_in(s, stages.image_id, ids), stages.status == "failed", stages.stage != "decode")
            .values(status="pending", error=None)
        )
    return before


def _put_back(catalog: Catalog, before: dict[str, tuple[str, str | None]], ids: Sequence[str]) -> None:
    """Gives images that were marked but not published their previous status back (one statement per distinct
    previous status)."""
    previous: dict[tuple[str, str | None], list[str]] = {}
    for image_id in ids:
        previous.setdefault(before.get(image_id, ("ingested", None)), []).append(image_id)
    with catalog.session() as s:
        for (status, error), same in previous.items():
            s.execute(
                update(ImageRow)
                .where(ImageRow.id.in_(same), ImageRow.status == "processing")
                .values(status=status, error=error)
            )


def batch_size(settings: Settings) -> int:
    """`curation_batch_size`, checked (ConfigError naming PONY_CURATION_BATCH_SIZE when it is not 1..256: every
    service takes at most 256 images per call by default)."""
    size = settings.curation_batch_size
    if not 1 <= size <= MAX_BATCH:
        raise ConfigError(f"PONY_CURATION_BATCH_SIZE: must be in 1..{MAX_BATCH}, got {size}")
    return size


def batches(image_ids: Sequence[str], size: int) -> list[list[str]]:
    """The distinct ids in order, cut into batches of `size` (the last one shorter)."""
    ids = list(dict.fromkeys(image_ids))
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def submit_images(settings: Settings, image_ids: Sequence[str]) -> list[str]:
    """Marks the images `processing` and publishes one workflow per batch of `curation_batch_size`; returns the ids
    sent.

    Raises BrokerUnavailable (naming PONY_BROKER_URL) when the broker cannot be reached; images not published keep
    their previous status."""
    from services.curation.tasks import workflow

    todo = batches(image_ids, batch_size(settings))
    if not todo:
        return []
    total = sum(len(b) for b in todo)
    check_broker(settings)
    catalog = catalog_for(settings.database_url)
    sent: list[str] = []
    for batch in todo:
        before = _mark_in_flight(catalog, batch)
        try:
            workflow(batch).apply_async()
        except Exception as exc:
            _put_back(catalog, before, batch)
            if _is_broker_error(exc):
                raise _broker_error(settings, exc, len(sent), total) from None
            raise
        sent += batch
    log.info("submitted images", extra={"count": len(sent), "batches": len(todo)})
    return sent


def _progress(settings: Settings, image_ids: Sequence[str]) -> tuple[dict[str, int], tuple[Any, ...]]:
    """Count of the given images per status, and a marker of their ledger activity (changes whenever a stage is
    claimed, retried, finished or failed)."""
    catalog = catalog_for(settings.database_url)
    counts: dict[str, int] = {}
    rows = attempts = 0
    last: Any = None
    with catalog.session() as s:
        for i in range(0, len(image_ids), _CHUNK):
            chunk = list(image_ids[i : i + _CHUNK])
            query = select(ImageRow.status, func.count()).where(ImageRow.id.in_(chunk)).group_by(ImageRow.status)
            for status, n in s.execute(query):
                counts[status] = counts.get(status, 0) + n
            n, tries, finished = s.execute(
                select(
                    func.count(), func.coalesce(func.sum(StageRow.attempts), 0), func.max(StageRow.finished_at)
                ).where(StageRow.image_id.in_(chunk))
            ).one()
            rows, attempts = rows + n, attempts + int(tries)
            if finished is not None and (last is None or finished > last):
                last = finished
    return counts, (tuple(sorted(counts.items())), rows, attempts, last)


def image_statuses(settings: Settings, image_ids: Sequence[str]) -> dict[str, int]:
    """Count of the given images per status."""
    return _progress(settings, image_ids)[0]


def queues_without_worker(settings: Settings, timeout_s: float = 2.0) -> list[str] | None:
    """The curation queues no running worker consumes (asked over the broker); None when the broker cannot say."""
    from pony_common.celery_app import app, configure_app

    if app.conf.get("pony_settings") != settings:
        configure_app(settings)
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception as exc:
        log.info("cannot ask the workers", extra={"error": _one_line(exc)})
        return None
    consumed = {q.get("name") for queues in replies.values() for q in (queues or [])}
    return [q for q in CURATION_QUEUES if q not in consumed]


def _no_worker(stall_s: float, idle: list[str] | None) -> NoWorker:
    queues = ", ".join(idle or CURATION_QUEUES)
    # A broker without broadcast (the embedded SQLite one) cannot list the workers: no progress is all we know.
    which = f"and no worker consumes the queues {queues}" if idle else f"(is a worker consuming the queues {queues}?)"
    return NoWorker(
        f"no image made progress in {stall_s:g} s {which}: start one with `ponyctl worker` (same PONY_BROKER_URL); "
        "the images stay queued and finish once it runs (or run `ponyctl ingest` of this source again)"
    )


def wait_for_images(
    settings: Settings,
    image_ids: Sequence[str],
    *,
    progress: bool = True,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
    stall_s: float | None = None,
) -> dict[str, int]:
    """Polls the catalog until every image is `done` or `failed` (or the timeout passes); returns the counts.

    After `stall_s` (default `settings.ingest_stall_s`; 0 = never) with no ledger activity at all for these
    images, asks the workers: raises NoWorker when some curation queue has none (the images stay queued), and
    goes on waiting when every queue has one (they are busy with other work)."""
    from tqdm import tqdm

    ids = list(dict.fromkeys(image_ids))
    stall = settings.ingest_stall_s if stall_s is None else stall_s
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    marker: tuple[Any, ...] | None = None
    changed = time.monotonic()
    with tqdm(total=len(ids), desc="curate", unit="img", disable=not progress) as bar:
        while True:
            counts, now_marker = _progress(settings, ids)
            finished = sum(counts.get(s, 0) for s in FINAL)
            bar.update(finished - bar.n)
            bar.set_postfix(done=counts.get("done", 0), failed=counts.get("failed", 0), refresh=False)
            if finished >= len(ids):
                return counts
            now = time.monotonic()
            if now_marker != marker:
                marker, changed = now_marker, now
            elif stall > 0 and now - changed >= stall:
                idle = queues_without_worker(settings)
                if idle is None or idle:
                    raise _no_worker(stall, idle)
                changed = now  # every queue has a worker: they are busy elsewhere
            if deadline is not None and now > deadline:
                log.warning("stopped waiting", extra={"finished": finished, "total": len(ids)})
                return counts
            time.sleep(poll_s)
