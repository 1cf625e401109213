"""Asynchronous generation jobs: SubmitJob -> a real Celery worker on the `generate` queue -> the sampler -> Triton;
GetJob/WatchJob/CancelJob, WatchJob's replay of the job's event log from a cursor, cancellation reaching the model,
priorities on a Redis broker."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pony.v1 import sampler_pb2
from pony_common.config import Settings
from pony_common.workers import start_worker, stop_worker
from services.sampler.client import SamplerClient
from tests.sampler_stack import SamplerStack

pytestmark = pytest.mark.triton

QUEUED, RUNNING = sampler_pb2.JOB_STATE_QUEUED, sampler_pb2.JOB_STATE_RUNNING
SUCCEEDED = sampler_pb2.JOB_STATE_SUCCEEDED


@contextmanager
def worker(settings: Settings, name: str) -> Iterator[subprocess.Popen]:
    """`ponyctl worker --queues generate` as its own process, stopped with SIGTERM (then SIGKILL)."""
    proc = start_worker(settings, ["generate"], name=name, log_path=Path(settings.state_dir) / f"{name}.log")
    try:
        yield proc
    finally:
        stop_worker(proc)


def wait_state(client: SamplerClient, job_id: str, states: set[int], timeout: float = 120) -> sampler_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id, omit_images=True)
        if job.state in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {sampler_pb2.JobState.Name(job.state)}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def client(sampler_stack: SamplerStack) -> Iterator[SamplerClient]:
    with SamplerClient(sampler_stack.settings, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def generate_worker(sampler_stack: SamplerStack) -> Iterator[subprocess.Popen]:
    with worker(sampler_stack.settings, "generate-worker") as proc:
        yield proc


def history(events: list[sampler_pb2.WatchJobResponse]) -> list[tuple[int, int, int]]:
    """(state, progress_step, progress_total) of the job as of each event."""
    return [(e.job.state, e.job.progress_step, e.job.progress_total) for e in events]


def full_run(steps: int) -> list[tuple[int, int, int]]:
    """A job that ran once without a retry: queued, running, every step 1..steps in order, succeeded."""
    return [
        (QUEUED, 0, 0),
        (RUNNING, 0, 0),
        *((RUNNING, step, steps) for step in range(1, steps + 1)),
        (SUCCEEDED, steps, steps),
    ]


@pytest.fixture(scope="module")
def finished_job(client, generate_worker) -> sampler_pb2.Job:
    """A job the worker ran to the end before anyone watched it."""
    job = client.submit_job("a pony on a hill", seed=5, steps=3)
    return wait_state(client, job.job_id, {SUCCEEDED, sampler_pb2.JOB_STATE_FAILED})


def test_a_job_runs_on_the_generate_queue_and_its_images_equal_a_direct_generate(client, generate_worker) -> None:
    job = client.submit_job("a pony in a meadow", seed=21, steps=3, score=8)
    assert job.job_id and job.state == sampler_pb2.JOB_STATE_QUEUED and job.priority == 5
    assert job.request.seed == 21
    seen = list(client.watch_job(job.job_id, timeout=180))
    assert seen[-1].job.state == SUCCEEDED, seen[-1].job.error
    # Every event of the job, in order, however fast it ran: no progress step is skipped.
    assert history(seen) == full_run(3)
    ids = [e.event_id for e in seen]
    assert ids == sorted(set(ids)) and ids[0] > 0
    assert all(not e.job.HasField("result") for e in seen[:-1])
    done = client.get_job(job.job_id)
    assert seen[-1].job.result == done.result and seen[-1].job.updated_at == done.updated_at
    assert (done.progress_step, done.progress_total) == (3, 3)
    (image,) = done.result.images
    assert image.uri and Path(image.uri).read_bytes() == image.png
    direct = client.generate("a pony in a meadow", seed=21, steps=3, score=8)
    assert image.png == direct.images[0].png
    assert done.result.prompt == "score_9, score_8, a pony in a meadow"  # V7: score 8 or better
    assert not client.get_job(job.job_id, omit_images=True).result.images[0].png


def test_a_watch_started_after_the_job_finished_replays_its_whole_history(client, finished_job) -> None:
    assert finished_job.state == SUCCEEDED, finished_job.error
    replay = list(client.watch_job(finished_job.job_id, timeout=60))
    assert history(replay) == full_run(3)
    assert replay[-1].job.result.images[0].png == client.get_job(finished_job.job_id).result.images[0].png
    assert list(client.watch_job(finished_job.job_id, timeout=60)) == replay  # the log does not change


def test_a_watch_resumed_from_a_cursor_yields_exactly_the_events_after_it(client, finished_job) -> None:
    def watch(job_id: str, after: int = 0) -> list[sampler_pb2.WatchJobResponse]:
        return list(client.watch_job(job_id, after_event_id=after, timeout=180, omit_images=True))

    replay = watch(finished_job.job_id)
    for i, event in enumerate(replay):
        resumed = watch(finished_job.job_id, event.event_id)
        assert resumed == replay[i + 1 :], f"resumed after event {i}"
    # A watch cut off while the job runs, resumed from its last event, misses nothing and repeats nothing.
    job = client.submit_job("a pony by a lake", seed=6, steps=3)
    stream = client.watch_job(job.job_id, timeout=180, omit_images=True)
    first = [next(stream), next(stream)]
    stream.close()
    rest = watch(job.job_id, first[-1].event_id)
    assert history(first + rest) == full_run(3)
    assert first + rest == watch(job.job_id)


def test_a_watch_of_an_unknown_job_is_not_found_and_a_negative_cursor_is_invalid(client, finished_job) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        list(client.watch_job("no-such-job", timeout=60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(client.watch_job(finished_job.job_id, after_event_id=-1, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("after_event_id:")


def test_a_job_without_a_seed_gets_one_at_submit_so_a_retry_draws_the_same_image(client) -> None:
    job = client.submit_job("a cat", steps=1)
    assert job.request.HasField("seed")
    client.cancel_job(job.job_id)


def test_cancelling_a_running_job_stops_the_model_and_a_queued_job_never_runs(
    sampler_stack: SamplerStack, client, generate_worker
) -> None:
    # 100 steps at 512 px: long enough on any machine that the cancel lands while it runs.
    running = client.submit_job("a slow owl", seed=1, steps=100, width=512, height=512)
    queued = client.submit_job("a second owl", seed=2, steps=2)
    job = wait_state(client, running.job_id, {sampler_pb2.JOB_STATE_RUNNING})
    while job.progress_step < 1:
        job = client.get_job(running.job_id, omit_images=True)
        time.sleep(0.1)
    assert client.cancel_job(queued.job_id).state == sampler_pb2.JOB_STATE_CANCELLED
    assert client.cancel_job(running.job_id).state == sampler_pb2.JOB_STATE_CANCELLED
    log = Path(sampler_stack.settings.state_dir) / "logs" / "tritonserver.log"
    deadline = time.monotonic() + 60
    pattern = f"pony_v7 request job-{running.job_id} cancelled after step"
    while pattern not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the cancel did not reach the model"
        time.sleep(0.2)
    # The worker moves on; the cancelled queued job is claimed by nobody and keeps its state.
    after = client.submit_job("a quick owl", seed=3, steps=1)
    assert wait_state(client, after.job_id, {sampler_pb2.JOB_STATE_SUCCEEDED}).state == sampler_pb2.JOB_STATE_SUCCEEDED
    for job_id in (running.job_id, queued.job_id):
        final = client.get_job(job_id, omit_images=True)
        assert final.state == sampler_pb2.JOB_STATE_CANCELLED
    assert client.get_job(queued.job_id).progress_step == 0
    # Cancelling a finished job changes nothing.
    assert client.cancel_job(after.job_id).state == sampler_pb2.JOB_STATE_SUCCEEDED


def test_an_invalid_job_is_rejected_at_submit_and_an_unknown_one_is_not_found(client) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("a pony", width=100)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("width:")
    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("a pony", priority=12)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("priority:")
    with pytest.raises(grpc.RpcError) as err:
        client.get_job("no-such-job")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_higher_priority_jobs_run_first_on_redis(sampler_stack: SamplerStack, redis_url: str) -> None:
    settings = sampler_stack.settings.replace(
        broker_url=redis_url, result_backend=redis_url, triton_start=False, triton_url=sampler_stack.model.url
    )
    server = sampler_stack.start_sampler(settings)
    try:
        target = f"127.0.0.1:{server.port}"
        with SamplerClient(settings, target=target, timeout=60) as c:
            low = [c.submit_job("a low pony", seed=s, steps=1, priority=0) for s in (1, 2)]
            high = c.submit_job("a high pony", seed=3, steps=1, priority=9)
            with worker(settings.replace(sampler_addr=target), "priority-worker"):
                finished = {
                    j.job_id: wait_state(c, j.job_id, {sampler_pb2.JOB_STATE_SUCCEEDED}, 180).updated_at.ToDatetime()
                    for j in (*low, high)
                }
        assert finished[high.job_id] < min(finished[j.job_id] for j in low)
    finally:
        sampler_stack.stop_server(server)
