"""`pony.v1.Scorer` over gRPC: converts protos to calls on the scorer model, the preference store and the head fit."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from sqlalchemy.exc import OperationalError

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, catalog_for
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, InvalidArgument, Overloaded, PonyError
from pony_common.imagerefs import ImageResolver, LoadedImage
from pony_common.metrics import BATCH_SIZE, ITEM_FAILURES, MODEL_INFO
from services.scorer.backend import AestheticScorer, Scored
from services.scorer.fit import FitConfig, fit_head, load_fit_data
from services.scorer.heads import HeadStore
from services.scorer.preferences import PreferenceStore

logger = logging.getLogger(__name__)

SERVICE = "scorer"
T = TypeVar("T")
_MAX_EPOCHS = 10_000


def _db(fn: Callable[..., T], *args: Any) -> T:
    """Runs `fn`; a database that cannot be reached becomes UNAVAILABLE (the caller may retry)."""
    try:
        return fn(*args)
    except OperationalError as exc:
        raise DependencyUnavailable(f"catalog database unavailable: {exc.orig}") from None


def _item_error(exc: InvalidArgument) -> common_pb2.ItemError:
    ITEM_FAILURES.labels(SERVICE, "invalid_image").inc()
    return common_pb2.ItemError(reason="invalid_image", message=exc.message, field=exc.field)


class ScorerServicer(scorer_pb2_grpc.ScorerServicer):
    """Per-image problems in a batch (empty, undecodable, too many pixels, unreadable URI) become the item's
    ItemError naming `images[i]`; problems with the request as a whole are INVALID_ARGUMENT."""

    def __init__(self, settings: Settings, scorer: AestheticScorer) -> None:
        self.settings = settings
        self.scorer = scorer
        self.resolver = ImageResolver(settings)
        self._decoder = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode")
        self._catalog: Catalog | None = None
        self._catalog_lock = threading.Lock()
        self._preferences: PreferenceStore | None = None
        self._heads: HeadStore | None = None
        self._fit_lock = threading.Lock()

    # --- lifecycle ---

    def catalog(self) -> Catalog:
        """The catalog, opened (and migrated) on first use; UNAVAILABLE when the database cannot be reached."""
        with self._catalog_lock:
            if self._catalog is None:
                try:
                    self._catalog = catalog_for(self.settings.database_url)
                except OperationalError as exc:
                    raise DependencyUnavailable(f"catalog database unavailable: {exc.orig}") from None
                self._preferences = PreferenceStore(
                    self._catalog, k=self.settings.scorer.elo_k, sample_size=self.settings.scorer.pair_sample
                )
                self._heads = HeadStore(
                    self._catalog, BlobStore(self.settings.blob_url), os.path.join(self.settings.state_dir, "heads")
                )
            return self._catalog

    @property
    def preferences(self) -> PreferenceStore:
        self.catalog()
        assert self._preferences is not None
        return self._preferences

    @property
    def heads(self) -> HeadStore:
        self.catalog()
        assert self._heads is not None
        return self._heads

    def load(self) -> None:
        """Loads the model; then, if configured, switches to the head marked active in the catalog."""
        self.scorer.load()
        if self.settings.scorer.head_from_catalog:
            try:
                stored = self.heads.active()
                if stored is not None and stored.version != self.scorer.head_version:
                    self.scorer.swap_head(stored.local_dir)
            except (PonyError, OperationalError, OSError, ValueError) as exc:
                logger.warning("keeping the configured head: no usable active head in the catalog (%s)", exc)
        self._publish_info()

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _publish_info(self) -> None:
        MODEL_INFO.labels(SERVICE).info(
            {"model": self.scorer.model_id, "version": self.scorer.model_version, "head": self.scorer.head_version}
        )

    # --- helpers ---

    def _check_batch(self, items: Sequence[Any], field: str) -> None:
        if not items:
            raise InvalidArgument(field, "at least one is required")
        if len(items) > self.settings.scorer.max_batch:
            raise InvalidArgument(field, f"{len(items)} given; at most {self.settings.scorer.max_batch} per call")

    def _load_images(self, refs: Sequence[common_pb2.ImageRef]) -> list[LoadedImage | InvalidArgument]:
        def load(i: int) -> LoadedImage | InvalidArgument:
            try:
                return self.resolver.load(refs[i], field=f"images[{i}]")
            except InvalidArgument as exc:
                return exc

        return list(self._decoder.map(load, range(len(refs))))

    def _provenance(self, head_version: str) -> common_pb2.Provenance:
        return common_pb2.Provenance(
            model=self.scorer.model_id, model_version=self.scorer.model_version, component_version=head_version
        )

    def _results(self, scored: Scored, ids: Sequence[str]) -> list[scorer_pb2.ScoreResult]:
        provenance = self._provenance(scored.head_version)
        return [
            scorer_pb2.ScoreResult(
                image_id=image_id,
                raw=v.raw,
                score=v.score,
                score_tag=v.tag,
                cumulative_tags=v.cumulative_tags,
                provenance=provenance,
            )
            for image_id, v in zip(ids, scored.values, strict=True)
        ]

    # --- scoring ---

    def _score(self, refs: Sequence[common_pb2.ImageRef], include_embeddings: bool) -> scorer_pb2.ScoreResponse:
        loaded = self._load_images(refs)
        good = [x for x in loaded if isinstance(x, LoadedImage)]
        BATCH_SIZE.labels(SERVICE, "score").observe(len(good))
        head = self.scorer.active_head
        embeddings = self.scorer.embed([x.image for x in good])
        scored = self.scorer.score_embeddings(embeddings, head)
        results = self._results(scored, [x.image_id for x in good])
        if include_embeddings:
            for result, vector in zip(results, embeddings.tolist(), strict=True):
                result.embedding.extend(vector)
        by_position = iter(results)
        results = []
        for ref, item in zip(refs, loaded, strict=True):
            if isinstance(item, InvalidArgument):
                results.append(scorer_pb2.ScoreResult(image_id=ref.image_id, error=_item_error(item)))
            else:
                results.append(next(by_position))
        return scorer_pb2.ScoreResponse(results=results)

    async def Score(self, request: scorer_pb2.ScoreRequest, context: aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        self._check_batch(request.images, "images")
        return await asyncio.to_thread(self._score, list(request.images), request.include_embeddings)

    def _embed(self, refs: Sequence[common_pb2.ImageRef]) -> scorer_pb2.EmbedResponse:
        loaded = self._load_images(refs)
        good = [x for x in loaded if isinstance(x, LoadedImage)]
        BATCH_SIZE.labels(SERVICE, "embed").observe(len(good))
        vectors = iter(self.scorer.embed([x.image for x in good]).tolist()) if good else iter(())
        results = []
        for ref, item in zip(refs, loaded, strict=True):
            if isinstance(item, InvalidArgument):
                results.append(scorer_pb2.EmbedResult(image_id=ref.image_id, error=_item_error(item)))
            else:
                results.append(scorer_pb2.EmbedResult(image_id=item.image_id, embedding=next(vectors)))
        return scorer_pb2.EmbedResponse(results=results, provenance=self._provenance(""), dim=self.scorer.dim)

    async def Embed(self, request: scorer_pb2.EmbedRequest, context: aio.ServicerContext) -> scorer_pb2.EmbedResponse:
        self._check_batch(request.images, "images")
        return await asyncio.to_thread(self._embed, list(request.images))

    def _embeddings_tensor(self, request: scorer_pb2.ScoreEmbeddingsRequest, width: int) -> torch.Tensor:
        rows = np.zeros((len(request.embeddings), width), dtype=np.float32)
        for i, embedding in enumerate(request.embeddings):
            values = embedding.values
            if len(values) != width:
                raise InvalidArgument(f"embeddings[{i}]", f"has {len(values)} values; the head takes {width}")
            row = np.asarray(values, dtype=np.float32)
            if not np.isfinite(row).all():
                raise InvalidArgument(f"embeddings[{i}]", "has non-finite values")
            if not np.any(row):
                raise InvalidArgument(f"embeddings[{i}]", "is all zeros")
            rows[i] = row
        return torch.from_numpy(rows)

    async def ScoreEmbeddings(
        self, request: scorer_pb2.ScoreEmbeddingsRequest, context: aio.ServicerContext
    ) -> scorer_pb2.ScoreEmbeddingsResponse:
        self._check_batch(request.embeddings, "embeddings")
        if request.image_ids and len(request.image_ids) != len(request.embeddings):
            raise InvalidArgument("image_ids", f"{len(request.image_ids)} ids for {len(request.embeddings)} embeddings")
        head = self.scorer.active_head
        embeddings = self._embeddings_tensor(request, head.info.in_features)
        BATCH_SIZE.labels(SERVICE, "score_embeddings").observe(len(embeddings))
        scored = await asyncio.to_thread(self.scorer.score_embeddings, embeddings, head)
        ids = list(request.image_ids) or [""] * len(embeddings)
        return scorer_pb2.ScoreEmbeddingsResponse(results=self._results(scored, ids))

    # --- preferences ---

    async def NextPair(
        self, request: scorer_pb2.NextPairRequest, context: aio.ServicerContext
    ) -> scorer_pb2.NextPairResponse:
        pair = await asyncio.to_thread(_db, lambda: self.preferences.next_pair(request.rater))
        return scorer_pb2.NextPairResponse(
            image_a=pair.image_a, image_b=pair.image_b, rating_a=pair.rating_a, rating_b=pair.rating_b
        )

    async def SubmitComparison(
        self, request: scorer_pb2.SubmitComparisonRequest, context: aio.ServicerContext
    ) -> scorer_pb2.SubmitComparisonResponse:
        done = await asyncio.to_thread(
            _db, lambda: self.preferences.submit(request.rater, request.winner_id, request.loser_id, request.tie)
        )
        recorded = Timestamp()
        recorded.FromDatetime(done.recorded_at)
        return scorer_pb2.SubmitComparisonResponse(
            winner_rating=done.winner_rating, loser_rating=done.loser_rating, recorded_at=recorded
        )

    # --- head training ---

    def _fit_config(self, request: scorer_pb2.FitHeadRequest) -> FitConfig:
        holdout = request.holdout_fraction or self.settings.scorer.fit_holdout
        if not (math.isfinite(holdout) and 0.0 < holdout < 1.0):
            raise InvalidArgument("holdout_fraction", f"must be in (0, 1) or 0 for the default, got {holdout}")
        epochs = request.epochs or self.settings.scorer.fit_epochs
        if not 0 < epochs <= _MAX_EPOCHS:
            raise InvalidArgument("epochs", f"must be in 1..{_MAX_EPOCHS} or 0 for the default, got {epochs}")
        weight = request.pairwise_weight or 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidArgument("pairwise_weight", f"must be positive or 0 for the default, got {weight}")
        return FitConfig(
            holdout_fraction=holdout,
            epochs=epochs,
            pairwise_weight=weight,
            seed=request.seed,
            elo_k=self.settings.scorer.elo_k,
            max_rated=self.settings.scorer.fit_max_rated,
        )

    def _fit(self, config: FitConfig, activate: bool) -> scorer_pb2.FitHeadResponse:
        base = self.scorer.active_head
        data = load_fit_data(self.catalog(), base.info.in_features, config)
        result = fit_head(data, config, (base.head, base.info), embedding_model=self.scorer.model_id)
        metrics = {
            "heldout_pairwise_accuracy": result.heldout_accuracy,
            "baseline_heldout_pairwise_accuracy": result.baseline_accuracy,
            "train_pairs": result.train_pairs,
            "heldout_pairs": result.heldout_pairs,
            "rated_images": result.rated_images,
            "dropped_pairs": data.dropped_pairs,
            "base_head_version": base.version,
            "embedding_model": self.scorer.model_id,
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
            self.scorer.swap_head(stored.local_dir)
            self._publish_info()
        return scorer_pb2.FitHeadResponse(
            head_version=stored.version,
            heldout_pairwise_accuracy=result.heldout_accuracy,
            train_pairs=result.train_pairs,
            heldout_pairs=result.heldout_pairs,
            rated_images=result.rated_images,
            activated=activate,
            baseline_heldout_pairwise_accuracy=result.baseline_accuracy,
            previous_head_version=base.version,
        )

    async def FitHead(
        self, request: scorer_pb2.FitHeadRequest, context: aio.ServicerContext
    ) -> scorer_pb2.FitHeadResponse:
        config = self._fit_config(request)
        if not self._fit_lock.acquire(blocking=False):
            raise Overloaded("a head fit is already running")

        def run() -> scorer_pb2.FitHeadResponse:
            try:
                return _db(self._fit, config, request.activate)
            finally:  # released by the thread, so a cancelled call cannot start a second fit beside it
                self._fit_lock.release()

        return await asyncio.to_thread(run)
