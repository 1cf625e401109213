"""The import contracts (.importlinter) hold on this tree, and each one fails when a violation is planted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(tree / ".importlinter")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages the contracts cover, to plant violations in."""
    for name in ("pony_common", "services"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests" / "architecture", tmp_path / "tests" / "architecture")
    (tmp_path / "tests" / "__init__.py").write_text("")
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_contracts_hold_on_this_tree() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


def test_the_unchanged_copy_passes(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_lazy_service_import_in_pony_common_breaks_the_contract(tree: Path) -> None:
    (tree / "pony_common" / "planted.py").write_text(
        "def f():\n    from services.scorer import app\n\n    return app\n"
    )
    result = lint(tree)
    assert result.returncode == 1
    assert "pony_common imports no service BROKEN" in result.stdout
    assert "pony_common.planted -> services.scorer.app" in result.stdout


def test_a_service_module_named_in_a_string_breaks_the_contract(tree: Path) -> None:
    (tree / "pony_common" / "planted.py").write_text(
        "import importlib\n\nMODULES = ['services.sampler.tasks']\n\n\n"
        "def f():\n    return importlib.import_module('services.scorer.app')\n"
    )
    result = lint(tree)
    assert result.returncode == 1
    assert "pony_common names no service module in a string BROKEN" in result.stdout
    assert "pony_common.planted:3 names 'services.sampler.tasks'" in result.stdout
    assert "pony_common.planted:7 names 'services.scorer.app'" in result.stdout


def test_a_service_importing_another_past_its_client_breaks_the_contract(tree: Path) -> None:
    (tree / "services" / "captioner" / "planted.py").write_text("from services.scorer import app\n")
    result = lint(tree)
    assert result.returncode == 1
    assert "services import each other only through client modules BROKEN" in result.stdout
    assert "services.captioner.planted -> services.scorer.app" in result.stdout


def test_an_import_through_the_client_module_is_allowed(tree: Path) -> None:
    (tree / "services" / "captioner" / "planted.py").write_text("from services.scorer import client\n")
    if not (tree / "services" / "scorer" / "client.py").exists():
        (tree / "services" / "scorer" / "client.py").write_text('"""Planted client."""\n')
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_import_cycle_breaks_the_contract(tree: Path) -> None:
    (tree / "pony_common" / "planted_a.py").write_text("from pony_common import planted_b\n")
    (tree / "pony_common" / "planted_b.py").write_text("def f():\n    from pony_common import planted_a\n")
    result = lint(tree)
    assert result.returncode == 1
    assert "no import cycles BROKEN" in result.stdout
    assert "pony_common.planted_a <-> pony_common.planted_b" in result.stdout
