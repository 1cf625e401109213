"""`ponyctl train`: a bad spec exits 2 with one line; `submit` goes through the controller over gRPC
(settings.trainer_addr), or with `--local` straight through a local-executor controller in the CLI process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pony_common.cli.main import main
from pony_common.config import Settings
from pony_common.testing import serve
from services.trainer.app import create_service
from services.trainer.local_run import demo_spec
from services.trainer.service import TrainerService
from tests.trainer.conftest import tiny_spec, write_spec


@pytest.fixture
def cli_env(model_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The environment `ponyctl` reads its settings from, pointing at this test's state and tiny models."""
    for key, value in {
        "PONY_STATE_DIR": model_settings.state_dir,
        "PONY_MODELS_DIR": model_settings.models_dir,
        "PONY_SAMPLER_ADDR": "",
        "PONY_LOG_JSON": "false",
        "PONY_LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(key, value)
    return Settings.from_env()


@pytest.fixture
def grpc_controller(cli_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrainerService]:
    """A TrainerService (local executor) served on a free port in a background event loop."""
    controller = TrainerService(cli_env)
    with serve(cli_env, create_service(cli_env, controller), ready_timeout=10) as served:
        monkeypatch.setenv("PONY_TRAINER_ADDR", served.address)
        yield controller


def test_a_bad_spec_exits_2_with_one_line(cli_env: Settings, manifest: Path, tmp_path: Path, capsys) -> None:
    bad = write_spec(tmp_path / "bad.yaml", tiny_spec(manifest, optimizer={"learning_rate": "fast"}))
    assert main(["train", "submit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "spec.optimizer.learning_rate" in err
    assert main(["train", "submit", str(tmp_path / "missing.yaml"), "--local"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.yaml").write_text("stages: [unclosed\n")
    assert main(["train", "submit", str(tmp_path / "junk.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_submit_local_trains_here_and_publishes(cli_env: Settings, manifest: Path, tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "spec.yaml", demo_spec(manifest, steps=2))
    assert main(["train", "submit", str(spec), "--local", "--run-id", "cli-local"]) == 0
    out = capsys.readouterr().out
    assert "step 1/2 loss" in out and "step 2/2 loss" in out
    assert "cli-local\tSucceeded\tstep 2/2" in out and "pony_v7=v1" in out
    assert f"checkpoint {cli_env.state_dir}/runs/cli-local/final" in out


def test_submit_goes_through_the_controller_over_grpc(
    grpc_controller: TrainerService, manifest: Path, tmp_path: Path, capsys
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", demo_spec(manifest, steps=2))
    assert main(["train", "submit", str(spec), "--run-id", "cli-grpc", "--wait"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("cli-grpc\tRunning")
    assert "step 2/2 loss" in out
    assert out.splitlines()[-1].startswith("cli-grpc\tSucceeded\tstep 2/2")
    assert grpc_controller.get("cli-grpc").model_version == 1  # the server's controller ran and published it
    assert main(["train", "get", "cli-grpc"]) == 0
    assert "Succeeded" in capsys.readouterr().out
    assert main(["train", "list", "--state", "succeeded"]) == 0
    assert capsys.readouterr().out.count("cli-grpc") == 1
    # the server validates too: INVALID_ARGUMENT comes back as exit 2 with the field
    long = write_spec(tmp_path / "long.yaml", tiny_spec(manifest, stages=[{"resolution": 32, "steps": 100000}]))
    assert main(["train", "submit", str(long), "--run-id", "Bad_Id"]) == 2
    assert "run_id" in capsys.readouterr().err
    assert main(["train", "submit", str(long), "--run-id", "cli-long"]) == 0
    assert main(["train", "cancel", "cli-long"]) == 0
    assert "cli-long\tCancelled" in capsys.readouterr().out
    assert main(["train", "get", "nope"]) == 1
