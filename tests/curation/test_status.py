"""`ponyctl status` from the ledger: per-stage counts, failures with reasons, waiting retries, throughput."""

from __future__ import annotations

from sqlalchemy import update

from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from services.curation.status import curation_status, format_status
from services.curation.store import StageRow, claim_stage, complete_stage, fail_stage
from tests.curation.pool import add_processed


def test_status_counts_stages_lists_failures_and_retries(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    ids = [add_processed(catalog, f"s{i}", "anime", 0.5) for i in range(4)]
    for image_id in ids[:3]:
        for stage in ("caption", "score", "style", "safety", "persist"):
            claim_stage(catalog, image_id, stage)
            complete_stage(catalog, image_id, stage)
    claim_stage(catalog, ids[3], "caption")
    fail_stage(catalog, ids[3], "caption", "invalid_image: truncated")
    claim_stage(catalog, ids[3], "score")
    with catalog.session() as s:
        s.execute(
            update(StageRow)
            .where(StageRow.image_id == ids[3], StageRow.stage == "score")
            .values(status="pending", error="retry 2: unavailable: failed to connect")
        )
    status = curation_status(catalog)
    by_stage = {r.stage: r for r in status.stages}
    assert (by_stage["caption"].done, by_stage["caption"].failed) == (3, 1)
    assert by_stage["score"].pending == 1 and by_stage["persist"].done == 3
    assert [(f.image_id, f.stage, f.reason) for f in status.failures] == [
        (ids[3], "caption", "invalid_image: truncated")
    ]
    assert [(f.stage, f.reason) for f in status.retrying] == [("score", "retry 2: unavailable: failed to connect")]
    assert status.images_per_second > 0
    text = format_status(status)
    assert "invalid_image: truncated" in text and "waiting to retry" in text and "images/s" in text


def test_status_shows_stages_waiting_on_a_service(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    ids = [add_processed(catalog, f"w{i}", "pony", 0.5) for i in range(3)]
    for image_id in ids:
        claim_stage(catalog, image_id, "caption")
        complete_stage(catalog, image_id, "caption")
    for image_id in ids[:2]:
        claim_stage(catalog, image_id, "score")
        with catalog.session() as s:
            s.execute(
                update(StageRow)
                .where(StageRow.image_id == image_id, StageRow.stage == "score")
                .values(status="waiting", error="retry 40: unavailable: failed to connect")
            )
    status = curation_status(catalog)
    score = next(r for r in status.stages if r.stage == "score")
    assert (score.waiting, score.pending, score.failed) == (2, 0, 0)
    assert status.waiting_images == 2 and not status.failures
    assert {(f.image_id, f.stage) for f in status.retrying} == {(i, "score") for i in ids[:2]}
    text = format_status(status)
    assert "waiting on a service: 2 images" in text and "retry 40: unavailable" in text
    # The retry's claim takes the stage back from waiting.
    assert claim_stage(catalog, ids[0], "score")
    assert curation_status(catalog).waiting_images == 1
