"""`ponyctl` curation verbs on bad input: exit code 2 and one line on stderr that names the fix, never a traceback."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from pony_common.cli.main import main
from pony_common.config import Settings
from services.curation.samples import write_sample_pool


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """`ponyctl` on the test's settings (embedded catalog), logging only warnings."""
    settings = settings.replace(log_level="WARNING")
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    return settings


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_select_with_shares_that_do_not_sum_to_one_exits_2_naming_the_sum(cli: Settings, capsys) -> None:
    assert main(["select", "--total", "4", "--mix", "pony=0.9,furry=0.9"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("ponyctl select: --mix: the shares sum to 1.8, not 1")
    assert "add up to 1, e.g. pony=0.5,furry=0.5" in line


def _shard(path: Path, pool_root: Path, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, rel in enumerate(names):
            data = (pool_root / rel).read_bytes()
            info = tarfile.TarInfo(f"{i:06d}{Path(rel).suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["not a tar", "truncated"])
def test_ingest_of_a_corrupt_shard_exits_2_naming_the_shard(cli: Settings, tmp_path: Path, capsys, damage: str) -> None:
    pool = write_sample_pool(tmp_path / "pool", per_category=1, near_duplicates=0, corrupt=0, blocked=0, size=48)
    good = _shard(tmp_path, pool.root, pool.images[:2])
    shard = tmp_path / "shards" / "000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"these bytes are no tar archive " * 40 if damage == "not a tar" else good[: len(good) // 3])
    assert main(["ingest", str(shard), "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"ponyctl ingest: {shard}: not a readable tar shard (")
    assert line.endswith("re-create it or leave it out of the source")


def test_report_onto_a_file_exits_2_asking_for_a_folder(cli: Settings, tmp_path: Path, capsys) -> None:
    target = tmp_path / "report.html"
    target.write_text("not a folder")
    assert main(["report", str(target)]) == 2
    line = one_line(capsys.readouterr().err)
    assert (
        line
        == f"ponyctl report: {target} is a file, not a folder: give a folder for the report (it writes DIR/index.html)"
    )
    assert target.read_text() == "not a folder"
