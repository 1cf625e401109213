"""The captioner's logic, no gRPC: checks a request against its budgets, builds each kind's prompt from the item's
tags and characters, generates in batches of one kind, cleans the text and reports per-item errors.

`CaptionerService.from_settings(settings)`, `service.model.load()`, then `service.caption(jobs)`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from pony_common.budgets import RequestBudget
from pony_common.config import Settings
from pony_common.errors import Cancelled, InvalidArgument
from pony_common.metrics import BATCH_SIZE, ITEM_FAILURES
from services.captioner.cleanup import CaptionCleaner
from services.captioner.model import CaptionerModel
from services.captioner.prompts import KIND_SPECS, KINDS, PromptBook, split_artist_tags

logger = logging.getLogger(__name__)

SERVICE = "captioner"
MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEXT = 256  # characters per tag, character or artist name
MAX_LIST = 512  # tags per item


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
    """Captions images of several kinds with one VLM, a batch of prompts of one kind per `generate` call.

    Decoding is greedy (deterministic); each kind's token budget is its own (KIND_SPECS) capped by
    `max_new_tokens`. A batch that fails is retried item by item so one bad item cannot fail the others.
    """

    def __init__(
        self,
        model: CaptionerModel,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 320,
        max_items: int = 256,
        prompts: PromptBook | None = None,
        cleaner: CaptionCleaner | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = max(1, int(max_new_tokens))
        self.max_items = max_items
        self.budget = budget or RequestBudget.from_settings(Settings(), max_items, "PONY_CAPTIONER_MAX_ITEMS")
        self.prompts = prompts or PromptBook.load()
        self.cleaner = cleaner or CaptionCleaner.load()

    @classmethod
    def from_settings(cls, settings: Settings) -> CaptionerService:
        """Model from `PONY_CAPTIONER_MODEL` (or models_dir/vlm); examples, fillers and blocklist from their paths."""
        c = settings.captioner
        prompts = PromptBook.load(c.fewshot_path or None, c.fewshot_per_prompt)
        return cls(
            CaptionerModel.from_settings(settings, template_version=prompts.version),
            batch_size=c.batch_size,
            max_new_tokens=c.max_new_tokens,
            max_items=c.max_items,
            prompts=prompts,
            cleaner=CaptionCleaner.load(c.filler_path or None, c.artist_blocklist_path or None),
            budget=RequestBudget.from_settings(settings, c.max_items, "PONY_CAPTIONER_MAX_ITEMS"),
        )

    @property
    def template_version(self) -> str:
        return self.prompts.version

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

    def _generate_isolated(
        self, images: list[Image.Image], prompts: list[str], max_new_tokens: int
    ) -> list[str | Exception]:
        """`generate` on the batch; when it fails, item by item so only the failing items fail."""
        try:
            return list(self.model.generate(images, prompts, max_new_tokens))
        except Exception as exc:
            if len(images) == 1:
                logger.exception("caption generation failed")
                return [exc]
            logger.warning("batch generation failed (%s); retrying item by item", exc)
        results: list[str | Exception] = []
        for image, prompt in zip(images, prompts, strict=True):
            results += self._generate_isolated([image], [prompt], max_new_tokens)
        return results

    def caption(
        self,
        jobs: Sequence[CaptionJob],
        max_new_tokens: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CaptionOutcome]:
        """Captions of every wanted kind for each job; per-job failures are in the job's outcome.

        `max_new_tokens` (0 = the configured cap) caps every kind's budget; `should_stop` is checked between
        batches and raises Cancelled when it returns True. UNAVAILABLE while the model is still loading.
        """
        check_max_new_tokens(max_new_tokens)
        cap = max_new_tokens or self.max_new_tokens
        wanted = [check_kinds(job.kinds, f"jobs[{i}].kinds") for i, job in enumerate(jobs)]
        self.model.require_ready()
        prepared = []
        for job in jobs:
            tags, tag_artists = split_artist_tags(job.tags)
            artists = [*job.artists, *tag_artists]
            tags = [t for t in tags if not self.cleaner.is_blocked_artist(t) and t not in artists]
            prepared.append((tags, [c for c in job.characters if c.strip()], artists))
        raw: list[dict[str, str]] = [{} for _ in jobs]
        failures: dict[int, str] = {}
        for kind in KINDS:
            todo = [i for i, kinds in enumerate(wanted) if kind in kinds]
            spec = KIND_SPECS[kind]
            for start in range(0, len(todo), self.batch_size):
                if should_stop is not None and should_stop():
                    raise Cancelled("caption request cancelled")
                chunk = [i for i in todo[start : start + self.batch_size] if i not in failures]
                if not chunk:
                    continue
                prompts = [self.prompts.prompt(kind, prepared[i][0], prepared[i][1]) for i in chunk]
                BATCH_SIZE.labels(SERVICE, kind).observe(len(chunk))
                texts = self._generate_isolated([jobs[i].image for i in chunk], prompts, min(spec.max_new_tokens, cap))
                for i, text in zip(chunk, texts, strict=True):
                    if isinstance(text, Exception):
                        failures[i] = f"caption generation failed ({type(text).__name__})"
                    else:
                        raw[i][kind] = text
        return [self._finish(i, wanted[i], prepared[i], raw[i], failures.get(i)) for i in range(len(jobs))]

    def _finish(
        self,
        index: int,
        kinds: Sequence[str],
        prepared: tuple[list[str], list[str], list[str]],
        raw: dict[str, str],
        failure: str | None,
    ) -> CaptionOutcome:
        if failure is not None:
            ITEM_FAILURES.labels(SERVICE, "internal").inc()
            return CaptionOutcome(error_reason="internal", error_message=failure)
        _, characters, artists = prepared
        model_id, model_version = self.model.model_id, self.model.model_version
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
