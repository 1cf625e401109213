"""The scorer's logic, no gRPC: scores, embeddings and rescoring of stored embeddings in batches with per-image
errors, Elo preference collection, and head fits that are published to the catalog and hot-swapped in.

`service = ScorerService(settings)`, `service.model.load()`, then `service.score(refs)`, `service.fit_head(...)`.
The gRPC servicer calls `score_async`/`embed_async`: their CLIP forwards go through one dynamic batcher, so
concurrent calls share model batches (`PONY_SCORER_BATCH_SIZE`, `PONY_SCORER_BATCH_DELAY_MS`)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pony_common.batching import DynamicBatcher
from pony_common.blobs import BlobStore
from pony_common.budgets import RequestBudget, load_images
from pony_common.catalog.db import Catalog
from pony_common.config import Settings
from pony_common.embeddings import check_embeddings
from pony_common.errors import InvalidArgument, Overloaded
from pony_common.imagerefs import ImageResolver, LoadedImage
from pony_common.metrics import BATCH_SIZE, ITEM_FAILURES
from services.scorer.fit import FitConfig, fit_data, fit_head
from services.scorer.model import SERVICE, Scored, ScorerModel, ScoreValue
from services.scorer.preferences import Pair, Preferences, Submitted
from services.scorer.store import HeadStore, PreferenceStore, catalog_errors, load_fit_rows, open_catalog

logger = logging.getLogger(__name__)

MAX_EPOCHS = 10_000
INVALID_IMAGE = "invalid_image"


@dataclass(frozen=True)
class Provenance:
    """What produced a value: the CLIP model, its weights hash and (for scores) the head version."""

    model: str
    model_version: str
    component_version: str = ""


@dataclass(frozen=True)
class ItemFailure:
    """An image of a batch that could not be used; `field` names it (`images[i]`, `images[i].uri`)."""

    image_id: str
    field: str
    message: str
    reason: str = INVALID_IMAGE


@dataclass(frozen=True)
class ImageScore:
    """One image's (or embedding's) score; `embedding` only when asked for."""

    image_id: str
    value: ScoreValue
    provenance: Provenance
    embedding: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ImageEmbedding:
    image_id: str
    embedding: list[float]


@dataclass(frozen=True)
class Embeddings:
    items: list[ImageEmbedding | ItemFailure]
    provenance: Provenance
    dim: int


@dataclass(frozen=True)
class FitRequest:
    """A head fit's parameters; 0 means the configured default."""

    holdout_fraction: float = 0.0
    epochs: int = 0
    pairwise_weight: float = 0.0
    seed: int = 0
    activate: bool = False


@dataclass(frozen=True)
class FitOutcome:
    head_version: str
    heldout_pairwise_accuracy: float
    baseline_heldout_pairwise_accuracy: float
    train_pairs: int
    heldout_pairs: int
    rated_images: int
    activated: bool
    previous_head_version: str


def _embeddings_tensor(vectors: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    return torch.from_numpy(check_embeddings(vectors, width, "embeddings"))


class ScorerService:
    """Per-image problems in a batch (empty, undecodable, too many pixels, unreadable URI) become that item's
    `ItemFailure` naming `images[i]`; problems with the request as a whole raise InvalidArgument.

    The catalog is opened on first use (UNAVAILABLE while it cannot be reached). With `head_from_catalog` the
    model starts with the head marked active in the catalog; `fit_head` publishes a new head version there and,
    when asked, swaps the running model to it.
    """

    def __init__(self, settings: Settings, model: ScorerModel | None = None) -> None:
        self.settings = settings
        self.config = settings.scorer
        head_source = self.active_head_dir if self.config.head_from_catalog else None
        self.model = model or ScorerModel.from_settings(settings, head_source=head_source)
        self.resolver = ImageResolver(settings)
        self.budget = RequestBudget.from_settings(settings, self.config.max_batch, "PONY_SCORER_MAX_BATCH")
        self._decoder = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode")
        self.batcher: DynamicBatcher[Image.Image, torch.Tensor] = DynamicBatcher(
            self._embed_batch,
            max_batch=max(1, self.config.batch_size),
            max_delay_s=max(0.0, self.config.batch_delay_ms) / 1000,
            name=SERVICE,
        )
        self._catalog: Catalog | None = None
        self._catalog_lock = threading.Lock()
        self._preferences: Preferences | None = None
        self._heads: HeadStore | None = None
        self._fit_lock = threading.Lock()

    # --- lifecycle ---

    def catalog(self) -> Catalog:
        """The catalog, opened (and migrated) on first use; UNAVAILABLE when the database cannot be reached."""
        with self._catalog_lock:
            if self._catalog is None:
                catalog = open_catalog(self.settings.database_url)
                self._preferences = Preferences(
                    PreferenceStore(catalog), k=self.config.elo_k, sample_size=self.config.pair_sample
                )
                self._heads = HeadStore(
                    catalog, BlobStore(self.settings.blob_url), os.path.join(self.settings.state_dir, "heads")
                )
                self._catalog = catalog
            return self._catalog

    @property
    def preferences(self) -> Preferences:
        self.catalog()
        assert self._preferences is not None
        return self._preferences

    @property
    def heads(self) -> HeadStore:
        self.catalog()
        assert self._heads is not None
        return self._heads

    def active_head_dir(self) -> Path | None:
        """A local folder with the head marked active in the catalog, or None when no head is marked."""
        with catalog_errors():
            stored = self.heads.active()
        return None if stored is None else stored.local_dir

    def close(self) -> None:
        self.batcher.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.model.teardown()

    # --- helpers ---

    def _check_batch(self, items: Sequence[Any], field: str) -> None:
        if not items:
            raise InvalidArgument(field, "at least one is required")
        self.budget.check_items(len(items), field)

    def _load_images(self, refs: Sequence[object]) -> list[LoadedImage | ItemFailure]:
        """Headers first: a request over the pixel or byte budget is refused before any pixel is decoded; then the
        images are decoded in parallel, a bad one its ItemFailure."""
        fields = [(f"images[{i}]", ref) for i, ref in enumerate(refs)]
        loaded = load_images(self.resolver, fields, self.budget, "images", self._decoder.map)
        out: list[LoadedImage | ItemFailure] = []
        for ref, item in zip(refs, loaded, strict=True):
            if isinstance(item, InvalidArgument):
                ITEM_FAILURES.labels(SERVICE, INVALID_IMAGE).inc()
                out.append(ItemFailure(getattr(ref, "image_id", ""), item.field, item.message))
            else:
                out.append(item)
        return out

    def _provenance(self, head_version: str) -> Provenance:
        return Provenance(self.model.model_id, self.model.model_version, head_version)

    def _scores(self, scored: Scored, ids: Sequence[str]) -> list[ImageScore]:
        provenance = self._provenance(scored.head_version)
        return [ImageScore(image_id, v, provenance) for image_id, v in zip(ids, scored.values, strict=True)]

    def _embed_batch(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """The batcher's model step: one CLIP forward over images merged from concurrent calls."""
        return list(self.model.embed(images))

    async def _embed_merged(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, dim) embeddings computed through the dynamic batcher; a failed model batch raises its error."""
        if not images:
            return torch.empty(0, self.model.dim, dtype=torch.float32)
        rows = await self.batcher.submit(list(images))
        for row in rows:
            if isinstance(row, BaseException):
                raise row
        return torch.stack(rows)  # type: ignore[arg-type]

    # --- scoring ---

    def _scored(
        self, loaded: list[LoadedImage | ItemFailure], embeddings: torch.Tensor, head: Any, include_embeddings: bool
    ) -> list[ImageScore | ItemFailure]:
        good = [x for x in loaded if isinstance(x, LoadedImage)]
        scores = self._scores(self.model.score_embeddings(embeddings, head), [x.image_id for x in good])
        if include_embeddings:
            scores = [
                ImageScore(s.image_id, s.value, s.provenance, vector)
                for s, vector in zip(scores, embeddings.tolist(), strict=True)
            ]
        by_position = iter(scores)
        return [item if isinstance(item, ItemFailure) else next(by_position) for item in loaded]

    def _embedded(self, loaded: list[LoadedImage | ItemFailure], embeddings: torch.Tensor) -> Embeddings:
        vectors = iter(embeddings.tolist())
        items: list[ImageEmbedding | ItemFailure] = [
            item if isinstance(item, ItemFailure) else ImageEmbedding(item.image_id, next(vectors)) for item in loaded
        ]
        return Embeddings(items, self._provenance(""), self.model.dim)

    @staticmethod
    def _good(loaded: list[LoadedImage | ItemFailure], stage: str) -> list[Image.Image]:
        images = [x.image for x in loaded if isinstance(x, LoadedImage)]
        BATCH_SIZE.labels(SERVICE, stage).observe(len(images))
        return images

    def score(self, refs: Sequence[object], include_embeddings: bool = False) -> list[ImageScore | ItemFailure]:
        """Scores images (`pony.v1.ImageRef`s or objects with the same fields), one result per ref in order."""
        self._check_batch(refs, "images")
        loaded = self._load_images(refs)
        head = self.model.active_head
        embeddings = self.model.embed(self._good(loaded, "score"))
        return self._scored(loaded, embeddings, head, include_embeddings)

    async def score_async(
        self, refs: Sequence[object], include_embeddings: bool = False
    ) -> list[ImageScore | ItemFailure]:
        """`score`, with the CLIP forward merged with concurrent calls' (decode and head in worker threads)."""
        self._check_batch(refs, "images")
        head = self.model.active_head  # UNAVAILABLE while loading, before anything is read
        loaded = await asyncio.to_thread(self._load_images, refs)
        embeddings = await self._embed_merged(self._good(loaded, "score"))
        return await asyncio.to_thread(self._scored, loaded, embeddings, head, include_embeddings)

    def embed(self, refs: Sequence[object]) -> Embeddings:
        """The L2-normalised CLIP embeddings of images, one result per ref in order."""
        self._check_batch(refs, "images")
        loaded = self._load_images(refs)
        images = self._good(loaded, "embed")
        embeddings = self.model.embed(images) if images else torch.empty(0, self.model.dim)
        return self._embedded(loaded, embeddings)

    async def embed_async(self, refs: Sequence[object]) -> Embeddings:
        """`embed`, with the CLIP forward merged with concurrent calls'."""
        self._check_batch(refs, "images")
        self.model.require_ready()  # UNAVAILABLE while loading, before anything is read
        loaded = await asyncio.to_thread(self._load_images, refs)
        return self._embedded(loaded, await self._embed_merged(self._good(loaded, "embed")))

    def score_embeddings(self, vectors: Sequence[Sequence[float]], image_ids: Sequence[str] = ()) -> list[ImageScore]:
        """Scores stored embeddings with the head alone; `image_ids` (optional) are echoed."""
        self._check_batch(vectors, "embeddings")
        if image_ids and len(image_ids) != len(vectors):
            raise InvalidArgument("image_ids", f"{len(image_ids)} ids for {len(vectors)} embeddings")
        head = self.model.active_head
        embeddings = _embeddings_tensor(vectors, head.info.in_features)
        BATCH_SIZE.labels(SERVICE, "score_embeddings").observe(len(embeddings))
        scored = self.model.score_embeddings(embeddings, head)
        return self._scores(scored, list(image_ids) or [""] * len(embeddings))

    # --- preferences ---

    def next_pair(self, rater: str) -> Pair:
        with catalog_errors():
            return self.preferences.next_pair(rater)

    def submit_comparison(self, rater: str, winner_id: str, loser_id: str, tie: bool = False) -> Submitted:
        with catalog_errors():
            return self.preferences.submit(rater, winner_id, loser_id, tie)

    # --- head training ---

    def _fit_config(self, request: FitRequest) -> FitConfig:
        holdout = request.holdout_fraction or self.config.fit_holdout
        if not (math.isfinite(holdout) and 0.0 < holdout < 1.0):
            raise InvalidArgument("holdout_fraction", f"must be in (0, 1) or 0 for the default, got {holdout}")
        epochs = request.epochs or self.config.fit_epochs
        if not 0 < epochs <= MAX_EPOCHS:
            raise InvalidArgument("epochs", f"must be in 1..{MAX_EPOCHS} or 0 for the default, got {epochs}")
        weight = request.pairwise_weight or 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidArgument("pairwise_weight", f"must be positive or 0 for the default, got {weight}")
        return FitConfig(
            holdout_fraction=holdout,
            epochs=epochs,
            pairwise_weight=weight,
            seed=request.seed,
            elo_k=self.config.elo_k,
            max_rated=self.config.fit_max_rated,
        )

    def fit_head(self, request: FitRequest) -> FitOutcome:
        """Trains a head version on the catalog's comparisons and scores, publishes it, and with `activate`
        swaps the running model to it. One fit at a time (RESOURCE_EXHAUSTED beside a running one)."""
        config = self._fit_config(request)
        if not self._fit_lock.acquire(blocking=False):
            raise Overloaded("a head fit is already running")
        try:
            with catalog_errors():
                return self._fit(config, request.activate)
        finally:
            self._fit_lock.release()

    def _fit(self, config: FitConfig, activate: bool) -> FitOutcome:
        base = self.model.active_head
        dim = base.info.in_features
        data = fit_data(load_fit_rows(self.catalog(), dim, config.max_rated, config.seed), dim)
        result = fit_head(data, config, (base.head, base.info), embedding_model=self.model.model_id)
        metrics = {
            "heldout_pairwise_accuracy": result.heldout_accuracy,
            "baseline_heldout_pairwise_accuracy": result.baseline_accuracy,
            "train_pairs": result.train_pairs,
            "heldout_pairs": result.heldout_pairs,
            "rated_images": result.rated_images,
            "dropped_pairs": data.dropped_pairs,
            "base_head_version": base.version,
            "embedding_model": self.model.model_id,
            "config": {
                "holdout_fraction": config.holdout_fraction,
                "epochs": config.epochs,
                "pairwise_weight": config.pairwise_weight,
                "seed": config.seed,
            },
        }
        metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        stored = self.heads.publish(result.head, result.info, metrics, activate)
        if activate:
            self.model.swap_head(stored.local_dir)
        return FitOutcome(
            head_version=stored.version,
            heldout_pairwise_accuracy=result.heldout_accuracy,
            baseline_heldout_pairwise_accuracy=result.baseline_accuracy,
            train_pairs=result.train_pairs,
            heldout_pairs=result.heldout_pairs,
            rated_images=result.rated_images,
            activated=activate,
            previous_head_version=base.version,
        )
