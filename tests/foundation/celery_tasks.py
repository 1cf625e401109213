"""A task for the broker tests: claims (image, stage), works for a while, completes it exactly once."""

from __future__ import annotations

import time
from typing import Any

from pony_common.catalog import catalog_for
from pony_common.celery_app import current_settings, pony_task
from services.curation.store import claim_stage, complete_stage


@pony_task("tests.slow_complete", queue="persist")
def slow_complete(self: Any, image_id: str, stage: str, work_s: float) -> bool:
    catalog = catalog_for(current_settings().database_url)
    claim_stage(catalog, image_id, stage)
    time.sleep(work_s)
    return complete_stage(catalog, image_id, stage)
