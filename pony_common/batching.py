"""A dynamic batcher like Triton's: concurrent requests to a model server are merged into model batches of at most
`max_batch` items, a batch starting when full or `max_delay_s` after its first item arrived."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pony_common.metrics import MODEL_BATCH_SIZE, MODEL_REQUESTS_MERGED

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher was closed before (or while) this item ran."""


@dataclass(eq=False)
class _Slot(Generic[T]):
    """One item waiting for a batch: the request it belongs to, when it arrived, where its result goes."""

    item: T
    request: int
    arrived: float
    future: asyncio.Future[object]


class DynamicBatcher(Generic[T, R]):
    """Runs `run` (synchronous, e.g. a model's forward) on batches merged from concurrent `submit`s.

    One batch at a time per batcher, in `executor` (default: a thread of the batcher's own). A request larger than
    `max_batch` is split across batches. `submit` returns one entry per item in order: `run`'s result, or an
    exception, either the one `run` raised for its whole batch or one `run` returned in that item's slot.
    A cancelled caller's items that have not started are dropped; the other callers are not affected.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch: int,
        max_delay_s: float,
        name: str,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {max_delay_s}")
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.name = name
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batch-{name}"
        )
        self._pending: collections.deque[_Slot[T]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None
        self._requests = 0
        self._closed = False
        self._batch_sizes = MODEL_BATCH_SIZE.labels(name)
        self._merged = MODEL_REQUESTS_MERGED.labels(name)

    async def submit(self, items: Sequence[T]) -> list[R | BaseException]:
        """Queues `items` and waits for their results (one per item, in order)."""
        if self._closed:
            raise BatcherClosed(f"batcher {self.name} is closed")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        self._bind(loop)
        assert self._wake is not None
        self._requests += 1
        now = loop.time()
        slots = [_Slot(item, self._requests, now, loop.create_future()) for item in items]
        self._pending.extend(slots)
        self._wake.set()
        futures = [slot.future for slot in slots]
        try:
            await asyncio.wait(futures)
        except BaseException:
            # Cancelled (or the loop is going away): items not yet taken are skipped by the worker.
            for future in futures:
                future.cancel()
            raise
        return [future.result() for future in futures]  # type: ignore[misc]

    def close(self) -> None:
        """Stops the worker (on its own loop, from any thread); waiting items get BatcherClosed, and so do later
        `submit`s. For a service's synchronous `close()`."""
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                current = asyncio.get_running_loop()
            except RuntimeError:
                current = None
            if current is loop:
                self._stop_worker()
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing is left to stop
                    loop.call_soon_threadsafe(self._stop_worker)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """`close()`, then waits until the worker has stopped."""
        worker = self._worker
        self.close()
        if worker is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def _stop_worker(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self._fail_pending(BatcherClosed(f"batcher {self.name} is closed"))

    # --- the worker: one per batcher, on the loop of the first submit ---

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop and self._worker is not None and not self._worker.done():
            return
        old = self._loop
        if old is not None and old is not loop and not old.is_closed() and old.is_running():
            raise RuntimeError(f"batcher {self.name} is in use by another event loop")
        # First use, or the earlier loop is gone (its items went with it).
        self._pending.clear()
        self._loop = loop
        self._wake = asyncio.Event()
        self._worker = loop.create_task(self._work(), name=f"batcher-{self.name}")

    def _fail_pending(self, error: BaseException) -> None:
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_result(error)

    def _drop_cancelled(self) -> None:
        if any(slot.future.done() for slot in self._pending):
            self._pending = collections.deque(slot for slot in self._pending if not slot.future.done())

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[_Slot[T]]:
        """Waits for a batch (full, or max_delay_s after its first item arrived) and takes it off the queue."""
        assert self._wake is not None
        while True:
            self._drop_cancelled()
            if self._pending:
                break
            self._wake.clear()
            await self._wake.wait()
        deadline = self._pending[0].arrived + self.max_delay_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
            self._drop_cancelled()
        self._drop_cancelled()
        count = min(self.max_batch, len(self._pending))
        return [self._pending.popleft() for _ in range(count)]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await self._gather(loop)
                if not batch:
                    continue
                results = await self._run_batch(loop, batch)
                for slot, result in zip(batch, results, strict=True):
                    if not slot.future.done():
                        slot.future.set_result(result)
        except Exception as exc:  # a bug here must not leave callers waiting forever; the next submit restarts it
            logger.exception("batcher worker failed", extra={"model": self.name})
            self._fail_pending(exc)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Slot[T]]) -> list[object]:
        self._batch_sizes.observe(len(batch))
        requests = {slot.request for slot in batch}
        if len(requests) > 1:
            self._merged.inc(len(requests))
        try:
            results = await loop.run_in_executor(self._executor, self._run, [slot.item for slot in batch])
        except asyncio.CancelledError:
            for slot in batch:
                if not slot.future.done():
                    slot.future.set_result(BatcherClosed(f"batcher {self.name} closed while this item ran"))
            raise
        except Exception as exc:  # the whole batch failed: that error in every slot
            logger.warning("model batch failed", extra={"model": self.name, "items": len(batch)}, exc_info=True)
            return [exc] * len(batch)
        results = list(results)
        if len(results) != len(batch):
            error = RuntimeError(f"{self.name}: the model returned {len(results)} results for {len(batch)} items")
            return [error] * len(batch)
        return results
