"""The dynamic batcher: concurrent submits merged into model batches, results per item in order, batch and item
errors, splitting, cancellation, close, metrics. Real asyncio; a gate (threading.Event) holds a batch in `run`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from pony_common.batching import BatcherClosed, DynamicBatcher

WAIT_S = 60  # a safety net only: every test finishes by events, never by waiting this long


class Model:
    """A stand-in `run` that records each batch; `gate` holds the next batch until set; `fail` raises for a batch."""

    def __init__(self, fn: Callable[[int], object] = lambda x: x * 10) -> None:
        self.fn = fn
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None

    def __call__(self, items: list[int]) -> list[object]:
        self.batches.append(list(items))
        self.started.set()
        assert self.gate.wait(WAIT_S)
        if self.fail is not None:
            raise self.fail
        return [self.fn(x) for x in items]


async def hold_first_batch(batcher: DynamicBatcher[int, object], model: Model, items: list[int]) -> asyncio.Task:
    """Starts a request whose batch then blocks in `run` until `model.gate` is set."""
    model.gate.clear()
    task = asyncio.create_task(batcher.submit(items))
    assert await asyncio.to_thread(model.started.wait, WAIT_S)
    return task


async def queued(*submits) -> list[asyncio.Task]:
    """Tasks for `submits`, each run up to the point its items are queued."""
    tasks = [asyncio.create_task(s) for s in submits]
    await asyncio.sleep(0)  # one loop turn: every task has queued its items and waits for them
    return tasks


def metric(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


@pytest.mark.asyncio
async def test_concurrent_requests_are_merged_and_results_stay_per_request() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.0, name="merge-test")
    try:
        first = await hold_first_batch(batcher, model, [1])
        tasks = await queued(batcher.submit([2, 3]), batcher.submit([4]), batcher.submit([5, 6, 7]))
        model.gate.set()
        assert await first == [10]
        assert await asyncio.gather(*tasks) == [[20, 30], [40], [50, 60, 70]]
        assert model.batches == [[1], [2, 3, 4, 5, 6, 7]]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_merged_batches_are_recorded_in_the_metrics() -> None:
    name = "metrics-test"
    count_before = metric("pony_model_batch_size_count", name)
    sum_before = metric("pony_model_batch_size_sum", name)
    merged_before = metric("pony_model_requests_merged_total", name)
    model = Model()
    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.0, name=name)
    try:
        first = await hold_first_batch(batcher, model, [1])
        tasks = await queued(batcher.submit([2]), batcher.submit([3, 4]))
        model.gate.set()
        await first
        await asyncio.gather(*tasks)
    finally:
        await batcher.aclose()
    assert metric("pony_model_batch_size_count", name) - count_before == 2
    assert metric("pony_model_batch_size_sum", name) - sum_before == 4
    assert metric("pony_model_requests_merged_total", name) - merged_before == 2


@pytest.mark.asyncio
async def test_a_request_larger_than_max_batch_is_split_in_order() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=3, max_delay_s=0.0, name="split-test")
    try:
        assert await batcher.submit(list(range(7))) == [x * 10 for x in range(7)]
        assert model.batches == [[0, 1, 2], [3, 4, 5], [6]]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_a_full_batch_starts_without_waiting_for_the_delay() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=4, max_delay_s=3600.0, name="full-test")
    try:
        tasks = await queued(batcher.submit([1, 2]), batcher.submit([3, 4]))
        assert await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S) == [[10, 20], [30, 40]]
        assert model.batches == [[1, 2, 3, 4]]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_a_partial_batch_starts_once_the_delay_has_passed() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=64, max_delay_s=0.01, name="delay-test")
    try:
        assert await asyncio.wait_for(batcher.submit([5]), WAIT_S) == [50]
        assert model.batches == [[5]]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_a_failed_batch_fails_every_item_of_every_request_in_it_and_the_next_batch_runs() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.0, name="fail-test")
    try:
        first = await hold_first_batch(batcher, model, [1])
        tasks = await queued(batcher.submit([2, 3]), batcher.submit([4]))
        model.fail = ValueError("out of memory")
        model.gate.set()
        a, b, c = await first, *(await asyncio.gather(*tasks))
        for result in [*a, *b, *c]:
            assert isinstance(result, ValueError) and str(result) == "out of memory"
        model.fail = None
        assert await batcher.submit([9]) == [90]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_an_item_error_returned_by_run_stays_in_that_items_slot() -> None:
    problem = ValueError("bad item")
    model = Model(lambda x: problem if x == 3 else x)
    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.0, name="item-error-test")
    try:
        first = await hold_first_batch(batcher, model, [1])
        tasks = await queued(batcher.submit([2, 3]), batcher.submit([4]))
        model.gate.set()
        assert await first == [1]
        assert await asyncio.gather(*tasks) == [[2, problem], [4]]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_a_wrong_number_of_results_is_an_error_for_the_batch() -> None:
    batcher = DynamicBatcher(lambda items: items[:-1], max_batch=16, max_delay_s=0.0, name="short-test")
    try:
        results = await batcher.submit([1, 2])
        assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in results)
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_a_cancelled_waiting_caller_is_dropped_and_the_others_are_served() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.0, name="cancel-test")
    try:
        first = await hold_first_batch(batcher, model, [1])
        gone, kept = await queued(batcher.submit([2, 3]), batcher.submit([4]))
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.gate.set()
        assert await first == [10]
        assert await kept == [40]
        assert model.batches == [[1], [4]]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_a_caller_cancelled_while_its_batch_runs_does_not_break_the_batch() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.0, name="cancel-running-test")
    try:
        running = await hold_first_batch(batcher, model, [1])
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        later = (await queued(batcher.submit([5])))[0]
        model.gate.set()
        assert await later == [50]
        assert model.batches == [[1], [5]]
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_close_fails_waiting_items_and_refuses_new_ones() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.0, name="close-test")
    first = await hold_first_batch(batcher, model, [1])
    (waiting,) = await queued(batcher.submit([2]))
    await batcher.aclose()
    model.gate.set()
    (running,) = await first
    (queued_result,) = await waiting
    assert isinstance(running, BatcherClosed)
    assert isinstance(queued_result, BatcherClosed)
    with pytest.raises(BatcherClosed):
        await batcher.submit([3])


def test_a_batcher_can_serve_a_later_event_loop() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch=4, max_delay_s=0.0, name="loops-test")
    assert asyncio.run(batcher.submit([1])) == [10]
    assert asyncio.run(batcher.submit([2, 3])) == [20, 30]
    asyncio.run(batcher.aclose())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(lambda items: items, max_batch=0, max_delay_s=0.0, name="bad")
    with pytest.raises(ValueError, match="max_delay_s"):
        DynamicBatcher(lambda items: items, max_batch=1, max_delay_s=-1.0, name="bad")
