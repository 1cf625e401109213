"""Prints the README's configuration table from pony_common/config.py (every PONY_* setting, its default, its note)."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pony_common.config import SECTIONS, Settings

LINE = re.compile(r"^    (?P<name>[a-z_0-9]+): (?P<type>[^=]+?) = (?P<default>.+?)(?:\s+# (?P<note>.*))?$")
TITLE = re.compile(r"^    # --- (?P<title>.+?) ---")
ENV_DEFAULT = re.compile(r'field\(default=(?P<default>.+?), metadata=env\("[A-Z_]+"\)\)$')


def _fields(cls: type) -> dict[str, tuple[str, str, str]]:
    """attribute -> (group title, default as written, note) from the class source."""
    out: dict[str, tuple[str, str, str]] = {}
    title = ""
    for line in inspect.getsource(cls).splitlines():
        if m := TITLE.match(line):
            title = m["title"]
        elif (m := LINE.match(line)) and m["name"] != "extra":
            default = m["default"].strip()
            if d := ENV_DEFAULT.match(default):
                default = d["default"]
            out[m["name"]] = (title, default, (m["note"] or "").strip())
    return out


def rows() -> list[tuple[str, str, str, str]]:
    shared = _fields(Settings)
    sections = {key: _fields(cls) for key, cls in SECTIONS.items()}
    out = []
    for env, section, attr in Settings.env_names():
        if section is None:
            title, default, note = shared[attr]
        else:
            _, default, note = sections[section][attr]
            title = f"{section.replace('_', '-')} (`settings.{section}`)"
        out.append((title, env, default, note))
    return out


def table() -> str:
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    current = None
    for section, env, default, note in rows():
        if section != current:
            lines.append(f"| **{section}** | | |")
            current = section
        shown = default.replace("|", "\\|")
        lines.append(f"| `{env}` | `{shown}` | {note.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
