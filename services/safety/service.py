"""The safety logic, no gRPC: request budgets, then the NSFW model + tag rules + the current codex -> one verdict
per item (`policy.py` decides). `SafetyService(settings)`, `service.model.load()`, then `service.check(items)`.
The gRPC servicer calls `check_async`: its CLIP forwards go through one dynamic batcher shared by concurrent calls,
and an item may carry its CLIP embedding (the scorer's) instead of an image: then no forward runs for it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pony_common.batching import DynamicBatcher
from pony_common.budgets import RequestBudget
from pony_common.config import ConfigError, Settings
from pony_common.embeddings import check_embedding, unit_rows
from pony_common.errors import InvalidArgument
from pony_common.metrics import BATCH_SIZE
from services.safety.codex import Codex
from services.safety.model import SERVICE, SafetyModel
from services.safety.policy import Policy, SafetyInput, SafetyVerdict
from services.safety.store import CodexStore

logger = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 20_000
MAX_NAMES = 1024
NOTHING_TO_CHECK = "needs an image, a caption, tags or character names"


def policy_from(settings: Settings) -> Policy:
    try:
        return Policy(
            settings.safety.explicit_threshold,
            settings.safety.questionable_threshold,
            settings.safety.ambiguous_explicit,
        )
    except ValueError as exc:
        raise ConfigError(f"safety settings: {exc}") from None


@dataclass(frozen=True)
class Provenance:
    """What the verdicts came from: the CLIP weights, and the head, tag-rule and codex versions."""

    model: str
    model_version: str
    component_version: str


class SafetyService:
    """Checks items against the loaded model, the tag rules and the codex.

    The codex is re-read from the catalog whenever its version changes (an import shows up on the next call).
    """

    def __init__(self, settings: Settings, model: SafetyModel | None = None) -> None:
        self.settings = settings
        self.policy = policy_from(settings)
        self.model = model or SafetyModel(settings)
        self.budget = RequestBudget.from_settings(settings, settings.safety.max_batch, "PONY_SAFETY_MAX_BATCH")
        self._codex: Codex | None = None
        self._lock = threading.Lock()
        self.batcher: DynamicBatcher[Image.Image, torch.Tensor] = DynamicBatcher(
            self._embed_batch,
            max_batch=max(1, settings.safety.batch_size),
            max_delay_s=max(0.0, settings.safety.batch_delay_ms) / 1000,
            name=SERVICE,
        )

    def close(self) -> None:
        self.batcher.close()
        self.model.teardown()

    def _embed_batch(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """The batcher's model step: one CLIP forward over images merged from concurrent calls."""
        return list(self.model.embed(images))

    def check_embedding(self, values: Sequence[float], field: str) -> np.ndarray:
        """A caller's CLIP embedding of an item's image as a unit row; INVALID_ARGUMENT naming `field` when its
        width is not the NSFW head's (or it is not finite or all zeros)."""
        self.model.require_ready()
        return unit_rows(check_embedding(values, self.model.dim, field)[None])[0]

    def check_request(self, count: int) -> None:
        """Raises UNAVAILABLE while the model loads, INVALID_ARGUMENT for no items or more than `max_batch`. The
        items' images are then held to `budget` (bytes, pixels) before any is decoded (pony_common.budgets)."""
        self.model.require_ready()
        if not count:
            raise InvalidArgument("items", "at least one item is required")
        self.budget.check_items(count, "items")

    def check_item(self, field: str, item: SafetyInput, has_image: bool = False) -> None:
        """Raises INVALID_ARGUMENT naming `field` when `item` (before its image is decoded: `has_image`) is over
        the budgets or has nothing to check."""
        if len(item.caption) > MAX_CAPTION_CHARS:
            raise InvalidArgument(f"{field}.caption", f"longer than {MAX_CAPTION_CHARS} characters")
        for name in ("tags", "characters"):
            if len(getattr(item, name)) > MAX_NAMES:
                raise InvalidArgument(f"{field}.{name}", f"more than {MAX_NAMES} entries")
        if item.empty and not has_image:
            raise InvalidArgument(field, NOTHING_TO_CHECK)

    def codex(self) -> Codex:
        """The current codex (reloaded when the catalog has a newer version)."""
        store = CodexStore(self.model.catalog)
        latest = store.latest_version()
        with self._lock:
            if self._codex is None or self._codex.version != latest:
                self._codex = store.load()
                logger.info("codex loaded", extra={"codex_version": self._codex.version})
            return self._codex

    def provenance(self) -> Provenance:
        codex = self._codex.version if self._codex else 0
        return Provenance(
            model=self.model.model_id,
            model_version=self.model.model_version,
            component_version=f"head:{self.model.head_version} rules:{self.model.rules.version} codex:v{codex}",
        )

    def _validated(self, items: Sequence[SafetyInput]) -> None:
        self.model.require_ready()
        for i, item in enumerate(items):
            if item.empty:
                raise InvalidArgument(f"items[{i}]", NOTHING_TO_CHECK)
        BATCH_SIZE.labels(SERVICE, "check").observe(len(items))

    def _decide(self, items: Sequence[SafetyInput], embedded: dict[int, torch.Tensor]) -> list[SafetyVerdict]:
        """Verdicts from the CLIP embeddings by item index (computed, or given with the item) and the rules."""
        codex = self.codex()
        for i, item in enumerate(items):
            if item.embedding is not None:
                embedded[i] = torch.as_tensor(np.asarray(item.embedding, dtype=np.float32))
        scores: dict[int, np.ndarray] = {}
        if embedded:
            order = sorted(embedded)
            probs = self.model.predict_embeddings(torch.stack([embedded[i] for i in order]))
            scores = dict(zip(order, probs, strict=True))
        rules = self.model.rules
        return [self.policy.decide(item, scores.get(i), codex, rules) for i, item in enumerate(items)]

    @staticmethod
    def _to_embed(items: Sequence[SafetyInput]) -> list[int]:
        return [i for i, item in enumerate(items) if item.image is not None and item.embedding is None]

    def check(self, items: Sequence[SafetyInput]) -> list[SafetyVerdict]:
        """One verdict per item, in order. An item needs an image (or its embedding), a caption, tags or
        characters."""
        self._validated(items)
        wanted = self._to_embed(items)
        vectors = self.model.embed([items[i].image for i in wanted]) if wanted else []
        return self._decide(items, dict(zip(wanted, vectors, strict=True)))

    async def check_async(self, items: Sequence[SafetyInput]) -> list[SafetyVerdict]:
        """`check`, with the CLIP forward merged with concurrent calls' (the rules in a worker thread)."""
        self._validated(items)
        wanted = self._to_embed(items)
        vectors = await self.batcher.submit([items[i].image for i in wanted]) if wanted else []
        for row in vectors:
            if isinstance(row, BaseException):
                raise row
        return await asyncio.to_thread(self._decide, items, dict(zip(wanted, vectors, strict=True)))  # type: ignore[arg-type]
