"""The README opens with the two commands, documents every PONY_* setting, and its config table is current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pony_common.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_demo_and_test_commands() -> None:
    block = re.search(r"```sh\n(.*?)```", README, re.S)
    assert block is not None and README.index(block.group(0)) < 30
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "ponyctl demo" in makefile and "pytest" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_documented_and_the_table_is_current() -> None:
    names = [name for name, _, _ in Settings.env_names()]
    missing = [n for n in names if f"`{n}`" not in README]
    assert not missing, f"README does not document {missing}: run scripts/config_table.py"
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_table.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert table in README, "the README's configuration table is stale: paste scripts/config_table.py's output"
