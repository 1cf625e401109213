"""`ponyctl eval style-adherence`: bad arguments end with exit code 2 and one line saying which."""

from __future__ import annotations

from pathlib import Path

import pytest

from pony_common.cli.main import main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--lora", "style=heavy"], "--lora"),
        (["--lora", "bad name=1"], "--lora"),
        (["--lora", "style=9"], "-4..4"),
        (["--seeds", "-1"], "--seeds"),
        (["--seeds", "many"], "--seeds"),
        (["--model", "Pony V7"], "--model"),
        (["--version", "x"], "--version"),
        (["--compare-to", "-2"], "--compare-to"),
        (["--local", "--size", "100"], "--size"),
        (["--local", "--contents", "portrait,nope"], "'nope'"),
        (["--local", "--seeds", "65"], "--seeds"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PONY_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main(["eval", "style-adherence", *argv]))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_an_out_path_that_is_a_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PONY_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "file").write_text("x")
    assert main(["eval", "style-adherence", "--local", "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err
