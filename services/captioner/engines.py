"""Where captions are generated: a `CaptionTask` is one image with the prompts of its kinds; an engine turns tasks into
raw texts. `LocalEngine` runs the VLM in this process, merging concurrent requests' tasks into model batches; the
OpenAI-compatible engine is in `openai_engine.py`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from pony_common.batching import DynamicBatcher
from pony_common.errors import Cancelled, DependencyUnavailable
from pony_common.metrics import BATCH_SIZE
from pony_common.models.lifecycle import Model
from services.captioner.model import CaptionerModel, PromptRow

logger = logging.getLogger(__name__)

SERVICE = "captioner"


@dataclass(frozen=True)
class CaptionTask:
    """One image and its prompts, `(prompt, max_new_tokens)` per kind wanted; `should_stop` says when the request it
    belongs to was cancelled or ran out of time (its tasks not yet started are then skipped)."""

    image: Image.Image
    prompts: tuple[tuple[str, int], ...]
    should_stop: Callable[[], bool] | None = None

    def stopped(self) -> bool:
        return self.should_stop is not None and self.should_stop()


# One entry per task: the raw text of each of its prompts, or why it has none.
TaskResult = list[str] | BaseException


class CaptionEngine(Protocol):
    """What `CaptionerService` needs of an engine. `model` is the lifecycle the bootstrap loads and health follows."""

    @property
    def model(self) -> Model: ...

    @property
    def model_id(self) -> str: ...

    @property
    def model_version(self) -> str: ...

    def generate(self, tasks: Sequence[CaptionTask]) -> list[TaskResult]:
        """Raw texts of every task, in the caller's thread."""
        ...

    async def submit(self, tasks: Sequence[CaptionTask]) -> list[TaskResult]:
        """Raw texts of every task, sharing the engine with concurrent callers."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """The VLM in this process. Concurrent `submit`s are merged by a dynamic batcher into model batches of up to
    `batch_size` images; a batch is ONE `generate` over all prompts of its images (each image encoded once). One
    batch runs at a time, in the batcher's thread; there is no lock between requests."""

    def __init__(self, model: CaptionerModel, *, batch_size: int = 16, batch_delay_s: float = 0.005) -> None:
        self._model = model
        self.batch_size = max(1, int(batch_size))
        self.batcher: DynamicBatcher[CaptionTask, list[str]] = DynamicBatcher(
            self.run_batch, max_batch=self.batch_size, max_delay_s=max(0.0, batch_delay_s), name=SERVICE
        )

    @property
    def model(self) -> CaptionerModel:
        return self._model

    @property
    def model_id(self) -> str:
        return self._model.model_id

    @property
    def model_version(self) -> str:
        return self._model.model_version

    def run_batch(self, tasks: list[CaptionTask]) -> list[TaskResult]:
        """One model batch. Tasks whose request has stopped are skipped (Cancelled); when the batch fails it is run
        again image by image, so a bad image fails alone."""
        results: list[TaskResult] = [Cancelled("caption request cancelled")] * len(tasks)
        live = [k for k, task in enumerate(tasks) if not task.stopped()]
        for k, result in zip(live, self._generate([tasks[k] for k in live]), strict=True):
            results[k] = result
        return results

    def _generate(self, tasks: list[CaptionTask]) -> list[TaskResult]:
        if not tasks:
            return []
        rows = [PromptRow(k, prompt, budget) for k, task in enumerate(tasks) for prompt, budget in task.prompts]
        BATCH_SIZE.labels(SERVICE, "generate").observe(len(rows))
        try:
            texts = iter(self._model.generate_rows([task.image for task in tasks], rows))
        except DependencyUnavailable:
            raise
        except Exception as exc:
            if len(tasks) == 1:
                logger.exception("caption generation failed")
                return [exc]
            logger.warning("batch generation failed (%s); retrying image by image", exc)
            return [result for task in tasks for result in self._generate([task])]
        return [[next(texts) for _ in task.prompts] for task in tasks]

    def generate(self, tasks: Sequence[CaptionTask]) -> list[TaskResult]:
        """`batch_size` images per model batch, in the caller's thread (in-process use; no merging)."""
        out: list[TaskResult] = []
        for start in range(0, len(tasks), self.batch_size):
            out += self.run_batch(list(tasks[start : start + self.batch_size]))
        return out

    async def submit(self, tasks: Sequence[CaptionTask]) -> list[TaskResult]:
        """Through the dynamic batcher: these tasks share model batches with concurrent callers'."""
        return list(await self.batcher.submit(list(tasks)))

    def close(self) -> None:
        self.batcher.close()
