"""A restarted local-executor controller relaunches the runs it left Running; training resumes from the latest
checkpoint and every step's loss is recorded once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pony_common.config import Settings
from services.trainer.service import TrainerService
from services.trainer.store import RUNNING, SUCCEEDED
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


def test_a_restarted_controller_relaunches_its_run_from_the_latest_checkpoint(
    local_settings: Settings, manifest: Path
) -> None:
    doc = tiny_spec(
        manifest,
        stages=[{"resolution": 32, "steps": 20, "bucket_step": 16}],
        checkpoint={"every": 2, "keep": 1},
        ema={"enabled": False},
    )
    first = TrainerService(local_settings)
    first.load()
    try:
        first.submit(doc, run_id="restart-1")
        wait_for(
            lambda: any(e.message.startswith("checkpoint") for e in first.events("restart-1")),
            what="a first checkpoint",
        )
    finally:
        first.close()  # kills the process; the run stays Running for the next controller
    stopped_at = first.get("restart-1")
    assert stopped_at.state == RUNNING and stopped_at.step < 20
    second = TrainerService(local_settings)
    second.load()
    try:
        done = wait_for(lambda: (r := second.get("restart-1")).terminal and r, what="the run to end")
        assert done.state == SUCCEEDED, done.reason
        messages = [e.message for e in second.events("restart-1") if e.kind == "log"]
        assert any(m.startswith("resumed at step") for m in messages)
        losses = [e.step for e in second.events("restart-1") if e.kind == "loss"]
        assert sorted(set(losses)) == list(range(1, 21))  # every step once, none twice
        assert len(losses) == 20
    finally:
        second.close()
