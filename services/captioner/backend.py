"""The captioner model: a transformers VLM (Auto classes) with batched generation, the prompt book and clean-up.
Knows nothing of gRPC: `VlmCaptioner.from_settings(settings)`, `load()`, then `caption(jobs)`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pony_common.config import Settings
from pony_common.errors import Cancelled, FailedPrecondition, InvalidArgument
from pony_common.metrics import BATCH_SIZE, ITEM_FAILURES
from pony_common.models.clip import weights_version
from pony_common.models.dtypes import torch_dtype
from services.captioner.cleanup import CaptionCleaner
from services.captioner.prompts import KIND_SPECS, KINDS, PromptBook, split_artist_tags
from services.captioner.vlm import load_vlm

logger = logging.getLogger(__name__)

SERVICE = "captioner"
MAX_NEW_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class CaptionJob:
    """One image to caption, with what the caller knows about it. `kinds` empty means all kinds."""

    image: Image.Image
    tags: Sequence[str] = ()
    characters: Sequence[str] = ()
    kinds: Sequence[str] = ()
    artists: Sequence[str] = ()


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


class VlmCaptioner:
    """Captions images of several kinds with one VLM, a batch of prompts of one kind per `generate` call.

    Decoding is greedy (deterministic); each kind's token budget is its own (KIND_SPECS) capped by
    `max_new_tokens`. A batch that fails is retried item by item so one bad item cannot fail the others.
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        max_new_tokens: int = 320,
        prompts: PromptBook | None = None,
        cleaner: CaptionCleaner | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = max(1, int(max_new_tokens))
        self.prompts = prompts or PromptBook.load()
        self.cleaner = cleaner or CaptionCleaner.load()
        self._model: Any = None
        self._processor: Any = None
        self._version = ""
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> VlmCaptioner:
        """Model from `PONY_CAPTIONER_MODEL` (or models_dir/vlm); examples, fillers and blocklist from their paths."""
        return cls(
            settings.model_path("captioner"),
            device=settings.device,
            dtype=torch_dtype(settings.dtype),
            batch_size=settings.captioner.batch_size,
            max_new_tokens=settings.captioner.max_new_tokens,
            prompts=PromptBook.load(settings.captioner.fewshot_path or None, settings.captioner.fewshot_per_prompt),
            cleaner=CaptionCleaner.load(
                settings.captioner.filler_path or None, settings.captioner.artist_blocklist_path or None
            ),
        )

    # --- lifecycle ---

    @property
    def ready(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Loads the model and processor through the Auto classes (idempotent, thread-safe)."""
        with self._load_lock:
            if self._model is not None:
                return
            model, processor = load_vlm(self.model_path, str(self.device), self.dtype)
            local = Path(self.model_path)
            revision = str(getattr(model.config, "_commit_hash", None) or "")
            self._version = weights_version(local) if local.is_dir() else revision[:12]
            self._processor = processor
            self._model = model
        logger.info("captioner ready", extra={"model": self.model_path, "model_version": self.model_version})

    @property
    def model_id(self) -> str:
        return self.model_path

    @property
    def model_version(self) -> str:
        return self._version or "unknown"

    @property
    def template_version(self) -> str:
        return self.prompts.version

    @property
    def model(self) -> Any:
        """The loaded transformers model (FailedPrecondition before `load()`)."""
        if self._model is None:
            raise FailedPrecondition("the captioner model is not loaded yet")
        return self._model

    @property
    def processor(self) -> Any:
        """The loaded processor (FailedPrecondition before `load()`)."""
        if self._processor is None:
            raise FailedPrecondition("the captioner model is not loaded yet")
        return self._processor

    # --- generation ---

    def chat_prompt(self, prompt: str) -> str:
        """The chat-formatted prompt with one image slot, or the bare prompt for processors without a chat template
        (Florence-2 style task prompts)."""
        if getattr(self._processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Raw generated text for each (image, prompt), one batched `generate` call, greedy."""
        if self._model is None:
            raise FailedPrecondition("the captioner model is not loaded yet")
        texts = [self.chat_prompt(p) for p in prompts]
        inputs = self._processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        inputs = {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        tokenizer = getattr(self._processor, "tokenizer", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        with self._generate_lock, torch.inference_mode():
            out = self._model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad
            )
        prompt_ids = inputs.get("input_ids")
        n = 0 if prompt_ids is None else prompt_ids.shape[1]
        if n and out.shape[1] >= n and torch.equal(out[:, :n], prompt_ids):
            out = out[:, n:]  # decoder-only models return the prompt first; encoder-decoders do not
        return self._processor.batch_decode(out, skip_special_tokens=True)

    def _generate_isolated(
        self, images: list[Image.Image], prompts: list[str], max_new_tokens: int
    ) -> list[str | Exception]:
        """`generate` on the batch; when it fails, item by item so only the failing items fail."""
        try:
            return list(self.generate(images, prompts, max_new_tokens))
        except Exception as exc:
            if len(images) == 1:
                logger.exception("caption generation failed")
                return [exc]
            logger.warning("batch generation failed (%s); retrying item by item", exc)
        results: list[str | Exception] = []
        for image, prompt in zip(images, prompts, strict=True):
            results += self._generate_isolated([image], [prompt], max_new_tokens)
        return results

    # --- captions ---

    def caption(
        self,
        jobs: Sequence[CaptionJob],
        max_new_tokens: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CaptionOutcome]:
        """Captions of every wanted kind for each job; per-job failures are in the job's outcome.

        `max_new_tokens` (0 = the configured cap) caps every kind's budget; `should_stop` is checked between
        batches and raises Cancelled when it returns True.
        """
        if not 0 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument("max_new_tokens", f"must be in 0..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")
        cap = max_new_tokens or self.max_new_tokens
        wanted = [check_kinds(job.kinds, f"jobs[{i}].kinds") for i, job in enumerate(jobs)]
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
        captions = []
        for kind in kinds:
            text = self.cleaner.clean(raw.get(kind, ""), KIND_SPECS[kind], characters, artists)
            if text:
                captions.append(CaptionText(kind, text, self.model_id, self.model_version, self.template_version))
            else:
                logger.info("empty caption dropped", extra={"item": index, "kind": kind})
        if not captions:
            ITEM_FAILURES.labels(SERVICE, "empty_caption").inc()
            return CaptionOutcome(
                error_reason="empty_caption", error_message=f"nothing usable was generated for {', '.join(kinds)}"
            )
        return CaptionOutcome(captions)
