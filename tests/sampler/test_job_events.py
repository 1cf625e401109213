"""The job event log (`job_events`) on SQLite and PostgreSQL: every change of a job appends one event with the job
as the change left it, a move that changes nothing appends none, a cursor returns exactly the later events, and
a watch sees every step of a job however fast it changes (no Triton: jobs are moved through the store)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pony_common.catalog import catalog_for
from pony_common.config import Settings
from services.sampler.model import SamplerModel
from services.sampler.safety_gate import SafetyGate
from services.sampler.service import SamplerService
from services.sampler.store import (
    CANCELLED,
    PROGRESS,
    QUEUED,
    REQUEUED,
    RUNNING,
    SUCCEEDED,
    JobEvent,
    JobStore,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def job_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "postgresql":
        settings = settings.replace(database_url=request.getfixturevalue("postgres_url"))
    return settings.replace(triton_start=False, sampler_safety="off")


@pytest.fixture
def store(job_settings: Settings) -> JobStore:
    return JobStore(catalog_for(job_settings.database_url))


def history(events: list[JobEvent]) -> list[tuple[str, str, int, int]]:
    return [(e.kind, e.state, e.progress_step, e.progress_total) for e in events]


def test_every_change_of_a_job_appends_one_event_with_the_job_as_the_change_left_it(store: JobStore) -> None:
    job = store.create({"prompt": "a pony"}, priority=3).id
    assert store.progress(job, 1, 2) is False  # not running: no change, no event
    assert store.claim(job)
    assert store.progress(job, 1, 2) and store.progress(job, 2, 2)
    assert store.requeue(job, "retrying: UNAVAILABLE")
    assert store.claim(job)
    assert store.progress(job, 1, 2)
    assert store.finish(job, SUCCEEDED, {"response": {"seed": 1}})
    # A finished job stays as it is, and its log with it.
    assert not store.finish(job, SUCCEEDED) and not store.claim(job) and not store.requeue(job, "late")
    assert store.cancel(job).state == SUCCEEDED
    events = store.events(job)
    assert history(events) == [
        (QUEUED, QUEUED, 0, 0),
        (RUNNING, RUNNING, 0, 0),
        (PROGRESS, RUNNING, 1, 2),
        (PROGRESS, RUNNING, 2, 2),
        (REQUEUED, QUEUED, 2, 2),
        (RUNNING, RUNNING, 2, 2),
        (PROGRESS, RUNNING, 1, 2),
        (SUCCEEDED, SUCCEEDED, 1, 2),
    ]
    assert events[4].error == "retrying: UNAVAILABLE" and events[5].error == ""
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    record = store.get(job)
    assert record.updated_at == events[-1].created_at
    assert record.as_of(events[-1]).result == {"response": {"seed": 1}}
    assert record.as_of(events[3]).result == {} and record.as_of(events[3]).state == RUNNING


def test_a_cancel_is_an_event_and_ends_the_log(store: JobStore) -> None:
    job = store.create({"prompt": "an owl"}).id
    assert store.cancel(job).state == CANCELLED
    assert not store.claim(job) and not store.progress(job, 1, 1)
    assert history(store.events(job)) == [(QUEUED, QUEUED, 0, 0), (CANCELLED, CANCELLED, 0, 0)]
    assert store.events(job)[-1].error == "cancelled by the caller"


def test_a_cursor_returns_exactly_the_events_after_it_and_only_of_its_job(store: JobStore) -> None:
    job, other = store.create({"prompt": "a"}).id, store.create({"prompt": "b"}).id
    store.claim(job)
    store.claim(other)
    for step in (1, 2, 3):
        store.progress(job, step, 3)
        store.progress(other, step, 3)
    events = store.events(job)
    assert len(events) == 5 and {e.job_id for e in events} == {job}
    for i, event in enumerate(events):
        assert store.events(job, event.id) == events[i + 1 :]
    assert store.events(job, 0) == events


def test_a_watch_sees_every_step_of_a_job_that_changes_faster_than_it_polls(job_settings: Settings) -> None:
    service = SamplerService(job_settings, SamplerModel(job_settings), SafetyGate(job_settings))
    steps = 30
    job = service.jobs.create({"prompt": "a quick pony"}).id

    def run_the_job() -> None:
        service.jobs.claim(job)
        for step in range(1, steps + 1):
            service.jobs.progress(job, step, steps)
        service.jobs.finish(job, SUCCEEDED, {"steps": steps})

    async def watch(after: int = 0) -> list[tuple[int, str, int, dict]]:
        return [
            (event.id, seen.record.state, seen.record.progress_step, seen.record.result)
            async for seen, event in service.watch_job(job, after_event_id=after, with_images=False)
        ]

    async def watch_while_it_runs() -> list[tuple[int, str, int, dict]]:
        watching = asyncio.ensure_future(watch())
        writer = threading.Thread(target=run_the_job)
        writer.start()
        try:
            return await watching
        finally:
            await asyncio.to_thread(writer.join)

    live = asyncio.run(watch_while_it_runs())
    expected = [(QUEUED, 0), (RUNNING, 0)] + [(RUNNING, s) for s in range(1, steps + 1)] + [(SUCCEEDED, steps)]
    assert [(state, step) for _, state, step, _ in live] == expected
    assert [result for *_, result in live] == [{}] * (steps + 2) + [{"steps": steps}]
    # Afterwards: the same history, and from a cursor exactly what follows it; past the end, nothing.
    assert asyncio.run(watch()) == live
    assert asyncio.run(watch(live[9][0])) == live[10:]
    assert asyncio.run(watch(live[-1][0])) == []


def test_a_negative_cursor_is_invalid_and_names_the_field(job_settings: Settings) -> None:
    from pony_common.errors import InvalidArgument

    service = SamplerService(job_settings, SamplerModel(job_settings), SafetyGate(job_settings))
    job = service.jobs.create({"prompt": "a"}).id

    async def watch() -> list:
        return [x async for x in service.watch_job(job, after_event_id=-1)]

    with pytest.raises(InvalidArgument) as err:
        asyncio.run(watch())
    assert err.value.field == "after_event_id"
