"""Prints the README's configuration table from pony_common/config.py (every PONY_* setting, its default, its note)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

LINE = re.compile(r"^    (?P<name>[a-z_0-9]+): (?P<type>[^=]+?) = (?P<default>.+?)(?:\s+# (?P<note>.*))?$")
SECTION = re.compile(r"^    # --- (?P<title>.+?) ---")


def rows(source: str) -> list[tuple[str, str, str, str]]:
    out = []
    section = ""
    in_class = False
    for line in source.splitlines():
        if line.startswith("class Settings"):
            in_class = True
            continue
        if in_class and line.startswith("    @classmethod"):
            break
        if not in_class:
            continue
        if m := SECTION.match(line):
            section = m["title"]
            continue
        m = LINE.match(line)
        if m and m["name"] != "extra":
            default = m["default"].strip()
            out.append((section, f"PONY_{m['name'].upper()}", default, (m["note"] or "").strip()))
    return out


def table(source: str) -> str:
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    current = None
    for section, env, default, note in rows(source):
        if section != current:
            lines.append(f"| **{section}** | | |")
            current = section
        shown = default.replace("|", "\\|")
        lines.append(f"| `{env}` | `{shown}` | {note.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    sys.stdout.write(table((root / "pony_common" / "config.py").read_text()) + "\n")
