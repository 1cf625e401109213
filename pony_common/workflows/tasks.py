"""Platform tasks every worker has: a round trip through the broker."""

from __future__ import annotations

from typing import Any

from pony_common.celery_app import pony_task


@pony_task("pony.ping", queue="default")
def ping(self: Any, payload: str = "pong") -> dict[str, Any]:
    """Round trip through the broker and a worker."""
    return {"payload": payload, "worker": self.request.hostname}
