"""The local executor: the entrypoint under `torchrun --standalone` (one CPU process, gloo) as a subprocess, with
the same state machine as Kubernetes runs, loss events, publish on success, cancel, and resume after a restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from diffusers import AuraFlowPipeline

from pony_common.catalog import catalog_for
from pony_common.catalog.models import ModelVersionRow
from pony_common.config import Settings
from services.trainer.executors.local import train_command
from services.trainer.local_run import demo_spec, train_locally
from services.trainer.service import TrainerService
from services.trainer.store import CANCELLED, RUNNING, SUCCEEDED
from tests.trainer.conftest import tiny_spec


@pytest.fixture
def local_settings(model_settings: Settings) -> Settings:
    return model_settings.replace(trainer_executor="local", sampler_addr="")


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_local_run_trains_publishes_and_records_its_losses(local_settings: Settings, manifest: Path) -> None:
    seen = []
    settings = local_settings.replace(trainer_local_launcher="torchrun")  # DDP: a one-process gloo group
    run = train_locally(settings, demo_spec(manifest, steps=4), on_event=lambda r, e: seen.append(e))
    assert run.state == SUCCEEDED, run.reason
    assert run.step == 4 and run.last_loss is not None
    assert [e.step for e in seen if e.kind == "loss"] == [1, 2, 3, 4]
    assert [e.state for e in seen if e.kind == "state"] == ["Pending", "Running", "Succeeded"]
    assert any("world size 1, backend gloo" in e.message for e in seen if e.kind == "log")
    assert run.model_version == 1
    assert run.checkpoint_uri == str(Path(local_settings.state_dir) / "runs" / run.id / "final")
    with catalog_for(local_settings.database_url).session() as s:
        row = s.get(ModelVersionRow, ("pony_v7", 1))
        assert row.uri == run.checkpoint_uri and row.source_run_id == run.id
    assert AuraFlowPipeline.from_pretrained(run.checkpoint_uri).transformer is not None


def test_cancel_kills_the_training_process_group(local_settings: Settings, manifest: Path) -> None:
    controller = TrainerService(local_settings)
    controller.load()
    try:
        doc = tiny_spec(manifest, stages=[{"resolution": 32, "steps": 100000, "bucket_step": 16}])
        run = controller.submit(doc, run_id="long-1")
        assert run.state == RUNNING
        pid = controller.executor._procs["long-1"].popen.pid
        wait_for(lambda: controller.get("long-1").step >= 1, what="a first step")
        cancelled = controller.cancel("long-1")
        assert cancelled.state == CANCELLED and cancelled.reason == "cancelled by user"
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        time.sleep(0.5)
        assert controller.get("long-1").state == CANCELLED  # the exit does not turn it into Failed
    finally:
        controller.close()


def test_the_launch_command_uses_torchrun_for_several_processes(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    one = train_command(spec, "r", 1)
    assert one[1:3] == ["-m", "services.trainer.training.train"]
    two = train_command(spec, "r", 2)
    assert two[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    assert two[-6:] == ["-m", "services.trainer.training.train", "--spec", str(spec), "--run-id", "r"]
    assert train_command(spec, "r", 1, "torchrun")[2] == "torch.distributed.run"
