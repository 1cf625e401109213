"""The captioner's logic, no gRPC: checks a request against its budgets, builds each kind's prompt from the item's
tags and characters, has an engine generate all kinds of all images (the local VLM in merged model batches, or an
OpenAI-compatible server), cleans the text and reports per-item errors.

`CaptionerService.from_settings(settings)`, `service.model.load()`, then `service.caption(jobs)` (in-process) or
`await service.caption_async(jobs)` (the gRPC servicer: concurrent calls share model batches)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from pony_common.batching import BatcherClosed
from pony_common.budgets import RequestBudget
from pony_common.config import ConfigError, Settings
from pony_common.errors import Cancelled, DependencyUnavailable, InvalidArgument
from pony_common.metrics import ITEM_FAILURES
from pony_common.models.lifecycle import Model
from services.captioner.cleanup import CaptionCleaner
from services.captioner.engines import CaptionEngine, CaptionTask, LocalEngine, TaskResult
from services.captioner.model import CaptionerModel
from services.captioner.openai_engine import OpenAIEngine
from services.captioner.prompts import KIND_SPECS, KINDS, PromptBook, split_artist_tags

logger = logging.getLogger(__name__)

SERVICE = "captioner"
MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEXT = 256  # characters per tag, character or artist name
MAX_LIST = 512  # tags per item
ENGINES = ("transformers", "openai")


@dataclass(frozen=True)
class CaptionJob:
    """One image to caption, with what the caller knows about it. `kinds` empty means all kinds."""

    image: Image.Image
    tags: Sequence[str] = ()
    characters: Sequence[str] = ()
    kinds: Sequence[str] = ()
    artists: Sequence[str] = ()


@dataclass(frozen=True)
class CaptionSpec:
    """A checked request item without its image: the kinds wanted (canonical order) and its non-blank names."""

    kinds: tuple[str, ...]
    tags: list[str]
    characters: list[str]
    artists: list[str]

    def job(self, image: Image.Image) -> CaptionJob:
        return CaptionJob(image, self.tags, self.characters, self.kinds, self.artists)


# An item's names as its prompts and clean-up use them: (tags, characters, artists).
Prepared = tuple[list[str], list[str], list[str]]


@dataclass(frozen=True)
class CaptionText:
    kind: str
    text: str
    model: str
    model_version: str
    template_version: str


@dataclass
class CaptionOutcome:
    """The captions of one job, or why it has none (`error_reason`, `error_message`)."""

    captions: list[CaptionText] = field(default_factory=list)
    error_reason: str = ""
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_reason


def check_kinds(kinds: Sequence[str], field: str = "kinds") -> tuple[str, ...]:
    """The kinds wanted, in canonical order, duplicates dropped; all kinds when empty."""
    for i, kind in enumerate(kinds):
        if kind not in KIND_SPECS:
            raise InvalidArgument(f"{field}[{i}]", f"unknown caption kind {kind!r}; kinds are {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds) if kinds else KINDS


def check_max_new_tokens(max_new_tokens: int) -> None:
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InvalidArgument("max_new_tokens", f"must be in 0..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")


def _strings(values: Sequence[str], field: str) -> list[str]:
    if len(values) > MAX_LIST:
        raise InvalidArgument(field, f"{len(values)} given; at most {MAX_LIST}")
    for j, value in enumerate(values):
        if len(value) > MAX_TEXT:
            raise InvalidArgument(f"{field}[{j}]", f"longer than {MAX_TEXT} characters")
    return [v for v in values if v.strip()]


class CaptionerService:
    """Captions images of several kinds with one VLM: every kind of every image of a batch in one `generate` call
    (local engine), or one request per (image, kind) to an OpenAI-compatible server (openai engine).

    Decoding is greedy (deterministic); each kind's token budget is its own (KIND_SPECS) capped by
    `max_new_tokens`. A batch that fails is retried image by image so one bad item cannot fail the others.
    """

    def __init__(
        self,
        model: CaptionerModel | CaptionEngine,
        *,
        batch_size: int = 16,
        batch_delay_ms: float = 5.0,
        max_new_tokens: int = 320,
        max_items: int = 256,
        prompts: PromptBook | None = None,
        cleaner: CaptionCleaner | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        self.batch_size = max(1, int(batch_size))
        if isinstance(model, CaptionerModel):
            model = LocalEngine(model, batch_size=self.batch_size, batch_delay_s=batch_delay_ms / 1000)
        self.engine: CaptionEngine = model
        self.max_new_tokens = max(1, int(max_new_tokens))
        self.max_items = max_items
        self.budget = budget or RequestBudget.from_settings(Settings(), max_items, "PONY_CAPTIONER_MAX_ITEMS")
        self.prompts = prompts or PromptBook.load()
        self.cleaner = cleaner or CaptionCleaner.load()

    @classmethod
    def from_settings(cls, settings: Settings) -> CaptionerService:
        """The engine of `PONY_CAPTIONER_ENGINE`: the VLM of `PONY_CAPTIONER_MODEL` (or models_dir/vlm) in this process,
        or the OpenAI-compatible server at `PONY_CAPTIONER_OPENAI_BASE_URL`; examples, fillers and blocklist from
        their paths."""
        c = settings.captioner
        prompts = PromptBook.load(c.fewshot_path or None, c.fewshot_per_prompt)
        engine: CaptionerModel | CaptionEngine
        if c.engine == "transformers":
            engine = CaptionerModel.from_settings(settings, template_version=prompts.version)
        elif c.engine == "openai":
            engine = OpenAIEngine.from_settings(settings, template_version=prompts.version)
        else:
            raise ConfigError(f"PONY_CAPTIONER_ENGINE={c.engine!r} is not an engine; use one of {', '.join(ENGINES)}")
        return cls(
            engine,
            batch_size=c.batch_size,
            batch_delay_ms=c.batch_delay_ms,
            max_new_tokens=c.max_new_tokens,
            max_items=c.max_items,
            prompts=prompts,
            cleaner=CaptionCleaner.load(c.filler_path or None, c.artist_blocklist_path or None),
            budget=RequestBudget.from_settings(settings, c.max_items, "PONY_CAPTIONER_MAX_ITEMS"),
        )

    @property
    def model(self) -> Model:
        """The engine's lifecycle: `load()` before captioning; readiness follows it."""
        return self.engine.model

    @property
    def template_version(self) -> str:
        return self.prompts.version

    def close(self) -> None:
        """Stops the engine (waiting calls get UNAVAILABLE) and frees the model."""
        self.engine.close()
        self.model.teardown()

    # --- request checks (before any image is read; the images' bytes and pixels against `budget` before any
    # pixel is decoded: pony_common.budgets.open_images) ---

    def check_request(self, count: int, max_new_tokens: int) -> None:
        """A whole-request problem (no items, too many, a bad token budget) is InvalidArgument naming the field."""
        if not count:
            raise InvalidArgument("items", "at least one item is required")
        self.budget.check_items(count, "items")
        check_max_new_tokens(max_new_tokens)

    @staticmethod
    def check_item(
        field: str, kinds: Sequence[str], tags: Sequence[str], characters: Sequence[str], artists: Sequence[str]
    ) -> CaptionSpec:
        """Item `field` (`items[i]`) checked: known kinds, tag lists and names within budget."""
        return CaptionSpec(
            kinds=check_kinds(kinds, f"{field}.kinds"),
            tags=_strings(tags, f"{field}.tags"),
            characters=_strings(characters, f"{field}.characters"),
            artists=_strings(artists, f"{field}.artists"),
        )

    @staticmethod
    def rejected_image(error: InvalidArgument) -> CaptionOutcome:
        """The outcome of an item whose image could not be read or decoded (the error names the image's field)."""
        ITEM_FAILURES.labels(SERVICE, "invalid_image").inc()
        return CaptionOutcome(error_reason="invalid_image", error_message=error.message)

    # --- captions ---

    def _prepare(
        self, jobs: Sequence[CaptionJob], max_new_tokens: int, should_stop: Callable[[], bool] | None
    ) -> tuple[list[tuple[str, ...]], list[Prepared], list[CaptionTask]]:
        """Each job's kinds, its prompt names (tags, characters, artists) and its task: one prompt per kind, each
        kind's budget capped by `max_new_tokens` (0 = the configured cap)."""
        check_max_new_tokens(max_new_tokens)
        cap = max_new_tokens or self.max_new_tokens
        wanted = [check_kinds(job.kinds, f"jobs[{i}].kinds") for i, job in enumerate(jobs)]
        self.model.require_ready()
        prepared: list[Prepared] = []
        tasks: list[CaptionTask] = []
        for job, kinds in zip(jobs, wanted, strict=True):
            tags, tag_artists = split_artist_tags(job.tags)
            artists = [*job.artists, *tag_artists]
            tags = [t for t in tags if not self.cleaner.is_blocked_artist(t) and t not in artists]
            characters = [c for c in job.characters if c.strip()]
            prepared.append((tags, characters, artists))
            prompts = tuple(
                (self.prompts.prompt(kind, tags, characters), min(KIND_SPECS[kind].max_new_tokens, cap))
                for kind in kinds
            )
            tasks.append(CaptionTask(job.image, prompts, should_stop))
        return wanted, prepared, tasks

    def _outcomes(
        self, wanted: list[tuple[str, ...]], prepared: list[Prepared], results: Sequence[TaskResult]
    ) -> list[CaptionOutcome]:
        """Cleaned captions per job; the engine being down or the request cancelled fails the whole call."""
        for result in results:
            if isinstance(result, DependencyUnavailable | Cancelled):
                raise result
            if isinstance(result, BatcherClosed):
                raise DependencyUnavailable("the captioner is shutting down; retry later") from result
        outcomes = []
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                failure = f"caption generation failed ({type(result).__name__})"
                outcomes.append(self._finish(i, wanted[i], prepared[i], {}, failure))
            else:
                raw = dict(zip(wanted[i], result, strict=True))
                outcomes.append(self._finish(i, wanted[i], prepared[i], raw, None))
        return outcomes

    def caption(
        self,
        jobs: Sequence[CaptionJob],
        max_new_tokens: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CaptionOutcome]:
        """Captions of every wanted kind for each job, in the caller's thread; per-job failures are in the job's
        outcome.

        `max_new_tokens` (0 = the configured cap) caps every kind's budget; `should_stop` is checked before each
        model batch and raises Cancelled when it returns True. UNAVAILABLE while the model is still loading.
        """
        wanted, prepared, tasks = self._prepare(jobs, max_new_tokens, should_stop)
        return self._outcomes(wanted, prepared, self.engine.generate(tasks) if tasks else [])

    async def caption_async(
        self,
        jobs: Sequence[CaptionJob],
        max_new_tokens: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CaptionOutcome]:
        """`caption`, with the jobs sharing model batches with concurrent calls (the engine's batcher, or the
        server's continuous batching)."""
        wanted, prepared, tasks = await asyncio.to_thread(self._prepare, jobs, max_new_tokens, should_stop)
        results = await self.engine.submit(tasks) if tasks else []
        return await asyncio.to_thread(self._outcomes, wanted, prepared, results)

    def _finish(
        self,
        index: int,
        kinds: Sequence[str],
        prepared: Prepared,
        raw: dict[str, str],
        failure: str | None,
    ) -> CaptionOutcome:
        if failure is not None:
            ITEM_FAILURES.labels(SERVICE, "internal").inc()
            return CaptionOutcome(error_reason="internal", error_message=failure)
        _, characters, artists = prepared
        model_id, model_version = self.engine.model_id, self.engine.model_version
        captions = []
        for kind in kinds:
            text = self.cleaner.clean(raw.get(kind, ""), KIND_SPECS[kind], characters, artists)
            if text:
                captions.append(CaptionText(kind, text, model_id, model_version, self.template_version))
            else:
                logger.info("empty caption dropped", extra={"item": index, "kind": kind})
        if not captions:
            ITEM_FAILURES.labels(SERVICE, "empty_caption").inc()
            return CaptionOutcome(
                error_reason="empty_caption", error_message=f"nothing usable was generated for {', '.join(kinds)}"
            )
        return CaptionOutcome(captions)
