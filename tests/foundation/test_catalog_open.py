"""Opening the catalog: concurrent openers of a fresh database all succeed (migrations run under a database lock),
an unreachable database is one line naming the URL (password masked) and the fix, postgres:// URLs work, relative
SQLite paths are taken under the state folder, and catalog commands show no Alembic chatter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from pony_common.catalog.db import Catalog, alembic_config, make_engine
from pony_common.config import ConfigError, Settings
from pony_common.errors import DependencyUnavailable
from services.stack.registry import load_all_tables
from tests.conftest import free_port

OPENERS = 8

# Each opener imports everything first, says so, and opens the catalog only when the test says go: all N start their
# migration at the same moment.
OPENER = """
import sys
from alembic import command  # noqa: F401  (imported before the go, so the openers race on the database alone)
from pony_common.catalog.db import Catalog
print("ready", flush=True)
sys.stdin.readline()
Catalog(sys.argv[1]).dispose()
print("opened", flush=True)
"""


def open_at_once(url: str, n: int = OPENERS) -> list[subprocess.CompletedProcess[str]]:
    """Opens the catalog at `url` from `n` separate processes at once; their outcomes."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", OPENER, url],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.communicate(timeout=60)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def check_migrated_once(url: str) -> None:
    from alembic.script import ScriptDirectory

    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) - {"alembic_version"} == load_all_tables()
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    finally:
        engine.dispose()
    assert versions == [ScriptDirectory.from_config(alembic_config(url)).get_current_head()]


def check_all_opened(results: list[subprocess.CompletedProcess[str]]) -> None:
    failed = [[e for e in r.stderr.splitlines() if e and not e.startswith("(")][-1:] for r in results if r.returncode]
    assert failed == [], f"{len(failed)} of {len(results)} openers failed: {failed}"
    assert all(r.stdout.endswith("opened\n") for r in results)


def test_concurrent_openers_of_a_fresh_postgresql_catalog_all_succeed(postgres_url: str) -> None:
    check_all_opened(open_at_once(postgres_url))
    check_migrated_once(postgres_url)


def test_concurrent_openers_of_a_fresh_sqlite_catalog_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'catalog.db'}"
    check_all_opened(open_at_once(url))
    check_migrated_once(url)


def closed_port_url() -> str:
    return f"postgresql+psycopg://pony:s3cret@127.0.0.1:{free_port()}/catalog"


def unknown_role_url(postgres_url: str) -> str:
    return postgres_url.replace("://postgres@", "://pony_no_such_role:s3cret@", 1)


def test_a_closed_port_is_one_line_naming_the_masked_url_and_the_fix() -> None:
    url = closed_port_url()
    with pytest.raises(DependencyUnavailable) as caught:
        Catalog(url)
    message = str(caught.value)
    assert "\n" not in message
    assert "s3cret" not in message
    assert url.replace("s3cret", "***") in message
    assert "is PostgreSQL running? check PONY_DATABASE_URL" in message


def test_an_unknown_role_is_one_line_naming_the_role_and_the_fix(postgres_url: str) -> None:
    url = unknown_role_url(postgres_url)
    assert url != postgres_url
    with pytest.raises(DependencyUnavailable) as caught:
        Catalog(url)
    message = str(caught.value)
    assert "\n" not in message
    assert "s3cret" not in message
    assert 'role "pony_no_such_role" does not exist' in message
    assert "check the user and password in PONY_DATABASE_URL" in message


def ponyctl(state_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PONY_")}
    environ.update({"PONY_STATE_DIR": str(state_dir), "PONY_LOG_JSON": "false", **env})
    return subprocess.run(
        [sys.executable, "-m", "pony_common.cli.main", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(params=["closed port", "unknown role"])
def unreachable_url(request: pytest.FixtureRequest) -> str:
    if request.param == "closed port":
        return closed_port_url()
    return unknown_role_url(request.getfixturevalue("postgres_url"))


def test_ponyctl_status_on_an_unreachable_catalog_exits_1_with_one_line(unreachable_url: str, tmp_path: Path) -> None:
    result = ponyctl(tmp_path / "state", "status", PONY_DATABASE_URL=unreachable_url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("ponyctl status: catalog database ")
    assert "PONY_DATABASE_URL" in result.stderr
    assert "s3cret" not in result.stderr


def test_catalog_commands_show_alembic_logging_only_at_debug(tmp_path: Path) -> None:
    quiet = ponyctl(tmp_path / "quiet", "status")
    assert quiet.returncode == 0, quiet.stderr
    assert "alembic" not in quiet.stderr
    assert "Running upgrade" not in quiet.stderr
    debug = ponyctl(tmp_path / "debug", "status", PONY_LOG_LEVEL="DEBUG")
    assert debug.returncode == 0, debug.stderr
    assert "Running upgrade" in debug.stderr  # Alembic's own line, whatever the log format


def test_a_postgres_scheme_url_opens_the_catalog(postgres_url: str) -> None:
    url = postgres_url.replace("postgresql+psycopg://", "postgres://", 1)
    assert url.startswith("postgres://")
    catalog = Catalog(url)
    try:
        with catalog.session() as s:
            assert s.execute(text("SELECT count(*) FROM images")).scalar_one() == 0
    finally:
        catalog.dispose()
    check_migrated_once(postgres_url)


def test_a_relative_sqlite_path_in_the_settings_is_taken_under_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    state = tmp_path / "state"
    settings = Settings.from_env({"PONY_STATE_DIR": str(state), "PONY_DATABASE_URL": "sqlite:///mine.db"})
    assert settings.database_url == f"sqlite:///{state / 'mine.db'}"
    Catalog(settings.database_url).dispose()
    assert (state / "mine.db").is_file()
    assert list(elsewhere.iterdir()) == []


def test_the_catalog_refuses_a_relative_sqlite_path_naming_an_absolute_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        Catalog("sqlite:///mine.db")
    assert str(caught.value) == (
        f"PONY_DATABASE_URL: the SQLite path 'mine.db' is relative; use an absolute one, e.g. sqlite:///{tmp_path}/mine.db"
    )
    assert list(tmp_path.iterdir()) == []
