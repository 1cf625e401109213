"""Settings come from PONY_* once; `ponyctl` answers bad arguments with exit code 2 and one line of reason."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from pony_common.cli.main import main
from pony_common.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_settings_read_types_and_fill_state_paths(tmp_path: Path) -> None:
    env = {
        "PONY_STATE_DIR": str(tmp_path),
        "PONY_MAX_MESSAGE_MB": "8",
        "PONY_LOG_JSON": "false",
        "PONY_IMAGE_FORMATS": "png, jpeg",
        "PONY_SCORER_MODEL": "openai/clip-vit-large-patch14",
        "PONY_SOMETHING_NEW": "kept",
    }
    s = Settings.from_env(env)
    assert s.max_message_mb == 8 and s.log_json is False
    assert s.image_formats == ("png", "jpeg")
    assert s.database_url == f"sqlite:///{tmp_path / 'catalog.db'}"
    assert s.broker_url.startswith("sqla+sqlite:///")
    assert s.model_path("scorer") == "openai/clip-vit-large-patch14"
    assert s.model_path("style-tagger") == str(tmp_path / "models" / "clip")
    assert s.port("style-tagger") == 50053
    assert s.extra == {"PONY_SOMETHING_NEW": "kept"}


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="PONY_MAX_MESSAGE_MB"):
        Settings.from_env({"PONY_MAX_MESSAGE_MB": "lots"})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pony_common.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "no-such-service"],
        ["serve", "scorer", "--port", "99999"],
        ["worker", "--queues", "nope"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr


def test_bad_environment_exits_2(tmp_path: Path) -> None:
    import os

    proc = run_cli("models", "tiny", str(tmp_path / "m"), env={**os.environ, "PONY_RPC_TIMEOUT_S": "soon"})
    assert proc.returncode == 2
    assert "PONY_RPC_TIMEOUT_S" in proc.stderr


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_models_tiny_command_writes_the_same_bytes_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "tiny", str(tmp_path / "a")]) == 0
    assert main(["models", "tiny", str(tmp_path / "b")]) == 0
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b
    assert {"clip", "vlm", "auraflow"} <= {name.split("/")[0] for name in a}
    assert "auraflow" in capsys.readouterr().out
