"""Tasks for the worker-metrics test: one that retries once and then records its item as failed, one that raises."""

from __future__ import annotations

from typing import Any

from pony_common.celery_app import pony_task
from pony_common.errors import DependencyUnavailable


@pony_task("tests.observability.flaky", queue="default")
def flaky(self: Any) -> dict[str, str]:
    """UNAVAILABLE-like on the first attempt (the house task retries it), then an item failure with its reason."""
    if self.request.retries < 1:
        raise DependencyUnavailable("the service is down")
    return {"status": "failed", "error": "invalid_image: cannot identify image file"}


@pony_task("tests.observability.boom", queue="default")
def boom(self: Any) -> None:
    """Fails for good."""
    raise ValueError("boom")
