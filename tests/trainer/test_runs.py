"""Runs in the catalog: the state machine only moves active runs, losses are recorded once per step, and
publishing allocates the next model version once per run."""

from __future__ import annotations

import pytest

from pony_common.catalog import catalog_for
from pony_common.config import Settings
from services.trainer.store import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, RunStore


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, settings: Settings) -> str:
    if request.param == "sqlite":
        return settings.database_url
    return request.getfixturevalue("postgres_url")


def store(url: str) -> RunStore:
    return RunStore(catalog_for(url))


def test_terminal_runs_do_not_change_state(database_url: str) -> None:
    runs = store(database_url)
    runs.create("r1", "tiny", {"stages": [{"steps": 3}]}, "local", "", "")
    assert runs.get("r1").state == PENDING and runs.get("r1").total_steps == 3
    assert runs.transition("r1", RUNNING, "started")
    assert not runs.transition("r1", RUNNING, "again")  # no duplicate state event
    assert runs.transition("r1", CANCELLED, "cancelled by user")
    assert not runs.transition("r1", SUCCEEDED, "late exit")
    assert not runs.transition("r1", FAILED, "late failure")
    run = runs.get("r1")
    assert (run.state, run.reason) == (CANCELLED, "cancelled by user")
    assert [e.state for e in runs.events("r1") if e.kind == "state"] == [PENDING, RUNNING, CANCELLED]


def test_losses_are_recorded_once_per_step(database_url: str) -> None:
    runs = store(database_url)
    runs.create("r2", "tiny", {}, "local", "", "")
    assert runs.record_loss("r2", 1, 0.5)
    assert runs.record_loss("r2", 2, 0.4)
    assert not runs.record_loss("r2", 1, 0.5)  # a relaunched run repeating step 1
    run = runs.get("r2")
    assert (run.step, run.last_loss) == (2, 0.4)
    assert [(e.step, e.loss) for e in runs.events("r2") if e.kind == "loss"] == [(1, 0.5), (2, 0.4)]


def test_publishing_takes_the_next_version_once_per_run(database_url: str) -> None:
    runs = store(database_url)
    for rid in ("a", "b"):
        runs.create(rid, "tiny", {}, "local", "", "")
    assert runs.publish("a", "pony_v7", "/x/a/final") == 1
    assert runs.publish("a", "pony_v7", "/x/a/final") == 1
    assert runs.publish("b", "pony_v7", "/x/b/final") == 2
    assert runs.get("b").checkpoint_uri == "/x/b/final"
    runs.activate("pony_v7", 2)
    assert runs.model_version("pony_v7", 2).active and not runs.model_version("pony_v7", 1).active
    # a version number the sampler chose is linked as given
    runs.create("c", "tiny", {}, "local", "", "")
    assert runs.publish("c", "pony_v7", "/x/c/final", version=7, active=True) == 7
    assert runs.model_version("pony_v7", 7).source_run_id == "c"
