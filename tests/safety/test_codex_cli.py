"""`ponyctl codex import/export`: a round trip through the CLI, versions, and bad files (exit 2, one line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pony_common.catalog.db import Catalog
from pony_common.config import Settings
from services.safety.codex import CodexCharacter, parse_codex
from services.safety.store import CodexStore

ROOT = Path(__file__).resolve().parents[2]

CODEX_YAML = """\
note: test codex
characters:
  - name: Twilight Sparkle
    aliases: [Princess Twilight, twilight_sparkle_(mlp)]
    franchise: My Little Pony
    age_class: adult
  - name: Sweetie Belle
    franchise: My Little Pony
    age_class: minor
  - name: Famous Singer
    age_class: adult
    real_person: true
  - name: Mystery Mare
    age_class: ambiguous
"""


def ponyctl(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PONY_STATE_DIR": settings.state_dir, "PONY_DATABASE_URL": settings.database_url}
    env["PONY_LOG_LEVEL"] = "WARNING"
    return subprocess.run(
        [sys.executable, "-m", "pony_common.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_export_round_trip_through_the_cli(settings: Settings, tmp_path: Path) -> None:
    source = tmp_path / "codex.yaml"
    source.write_text(CODEX_YAML, encoding="utf-8")
    first = ponyctl(settings, "codex", "import", str(source))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"codex v1: imported, 4 characters from {source}"

    exported = tmp_path / "out.yaml"
    out = ponyctl(settings, "codex", "export", str(exported))
    assert out.returncode == 0, out.stderr
    data = yaml.safe_load(exported.read_text(encoding="utf-8"))
    assert data["codex_version"] == 1
    assert sorted(parse_codex(exported.read_text()), key=lambda c: c.key) == sorted(
        parse_codex(CODEX_YAML), key=lambda c: c.key
    )

    # Re-importing the export changes nothing: same version.
    again = ponyctl(settings, "codex", "import", str(exported))
    assert again.returncode == 0 and again.stdout.startswith("codex v1: unchanged")

    # A changed file makes version 2; export to stdout shows it.
    changed = tmp_path / "changed.yaml"
    changed.write_text(CODEX_YAML.replace("age_class: ambiguous", "age_class: adult"), encoding="utf-8")
    assert ponyctl(settings, "codex", "import", str(changed)).stdout.startswith("codex v2: imported")
    stdout = ponyctl(settings, "codex", "export", "-")
    assert yaml.safe_load(stdout.stdout)["codex_version"] == 2
    assert "ambiguous" not in stdout.stdout


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("characters: [{name: X, age_class: teen}]", "characters[0].age_class: 'teen' is not one of"),
        ("characters: [ {name: X", "not valid YAML"),
        ("characters: [{name: A, age_class: adult}, {name: a, age_class: minor}]", "is the same name as"),
        (None, "no such file"),
    ],
)
def test_a_bad_file_exits_2_with_one_line(settings: Settings, tmp_path: Path, content: str | None, reason: str) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = ponyctl(settings, "codex", "import", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ponyctl codex: ") and reason in lines[0], result.stderr
    assert result.stdout == ""


def test_export_to_a_missing_folder_exits_2(settings: Settings, tmp_path: Path) -> None:
    result = ponyctl(settings, "codex", "export", str(tmp_path / "nope" / "codex.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'c.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    cat = Catalog(url)
    yield cat
    cat.dispose()


def test_store_versions_replace_and_merge(catalog: Catalog) -> None:
    store = CodexStore(catalog)
    assert store.latest_version() == 0 and store.load().characters == ()
    a = CodexCharacter("Alpha", ("Al",), "F", "adult")
    b = CodexCharacter("Beta", (), "F", "minor")
    c = CodexCharacter("Gamma", (), "", "ambiguous")
    assert store.import_characters([a, b]) == (1, True)
    assert store.import_characters([b, a]) == (1, False)
    assert store.import_characters([c], merge=True) == (2, True)
    assert {x.name for x in store.load().characters} == {"Alpha", "Beta", "Gamma"}
    b2 = CodexCharacter("Beta", ("B",), "F", "adult")
    assert store.import_characters([b2]) == (3, True)  # replace: only Beta remains, changed
    codex = store.load()
    assert codex.version == 3 and codex.characters == (b2,)
    assert codex.lookup("alpha") is None and codex.lookup("b") == b2
