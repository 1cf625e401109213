"""Progress events of the training entrypoint: one JSON object per stdout line, parsed back by the executors.

Kinds: `start`, `stage`, `step` (with `loss`), `validation` (image paths), `checkpoint`, `done`. Other stdout
lines are not events.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

EVENT_KEY = "pony_event"


def format_event(kind: str, **fields: Any) -> str:
    return json.dumps({EVENT_KEY: kind, **fields}, sort_keys=True)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event on a line, with its kind under "kind"; None for any other line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or EVENT_KEY not in data:
        return None
    data["kind"] = data.pop(EVENT_KEY)
    return data


class EventWriter:
    """Writes events to a stream (stdout by default), flushed per line; silent on ranks other than 0."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        self.events.append({"kind": kind, **fields})
        out = self.stream or sys.stdout
        out.write(format_event(kind, **fields) + "\n")
        out.flush()
