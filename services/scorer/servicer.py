"""`pony.v1.Scorer` over gRPC: protos to `ScorerService` calls (in a worker thread) and its results back to protos."""

from __future__ import annotations

import asyncio

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.fields import check_id, check_ids
from pony_common.grpc.auth import Role
from services.scorer.service import FitRequest, ImageScore, ItemFailure, Provenance, ScorerService


def _provenance(p: Provenance) -> common_pb2.Provenance:
    return common_pb2.Provenance(model=p.model, model_version=p.model_version, component_version=p.component_version)


def _error(failure: ItemFailure) -> common_pb2.ItemError:
    return common_pb2.ItemError(reason=failure.reason, message=failure.message, field=failure.field)


def _score_result(item: ImageScore | ItemFailure) -> scorer_pb2.ScoreResult:
    if isinstance(item, ItemFailure):
        return scorer_pb2.ScoreResult(image_id=item.image_id, error=_error(item))
    return scorer_pb2.ScoreResult(
        image_id=item.image_id,
        raw=item.value.raw,
        score=item.value.score,
        score_tag=item.value.tag,
        cumulative_tags=item.value.cumulative_tags,
        provenance=_provenance(item.provenance),
        embedding=item.embedding,
    )


class ScorerServicer(scorer_pb2_grpc.ScorerServicer):
    """Transport only: the service raises domain errors, the server's interceptor maps them to status codes."""

    # The role each method needs (pony_common.grpc.auth: generate < worker < admin); every method has one.
    ROLES = {
        "Score": Role.WORKER,
        "Embed": Role.WORKER,
        "ScoreEmbeddings": Role.WORKER,
        "NextPair": Role.GENERATE,
        "SubmitComparison": Role.GENERATE,
        "FitHead": Role.ADMIN,
    }

    def __init__(self, service: ScorerService) -> None:
        self.service = service

    async def Score(self, request: scorer_pb2.ScoreRequest, context: aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        items = await self.service.score_async(list(request.images), request.include_embeddings)
        return scorer_pb2.ScoreResponse(results=[_score_result(item) for item in items])

    async def Embed(self, request: scorer_pb2.EmbedRequest, context: aio.ServicerContext) -> scorer_pb2.EmbedResponse:
        embedded = await self.service.embed_async(list(request.images))
        results = [
            scorer_pb2.EmbedResult(image_id=item.image_id, error=_error(item))
            if isinstance(item, ItemFailure)
            else scorer_pb2.EmbedResult(image_id=item.image_id, embedding=item.embedding)
            for item in embedded.items
        ]
        return scorer_pb2.EmbedResponse(results=results, provenance=_provenance(embedded.provenance), dim=embedded.dim)

    async def ScoreEmbeddings(
        self, request: scorer_pb2.ScoreEmbeddingsRequest, context: aio.ServicerContext
    ) -> scorer_pb2.ScoreEmbeddingsResponse:
        check_ids(request.image_ids, "image_ids")
        vectors = [embedding.values for embedding in request.embeddings]
        items = await asyncio.to_thread(self.service.score_embeddings, vectors, list(request.image_ids))
        return scorer_pb2.ScoreEmbeddingsResponse(results=[_score_result(item) for item in items])

    async def NextPair(
        self, request: scorer_pb2.NextPairRequest, context: aio.ServicerContext
    ) -> scorer_pb2.NextPairResponse:
        check_id(request.rater, "rater")
        pair = await asyncio.to_thread(self.service.next_pair, request.rater)
        return scorer_pb2.NextPairResponse(
            image_a=pair.image_a, image_b=pair.image_b, rating_a=pair.rating_a, rating_b=pair.rating_b
        )

    async def SubmitComparison(
        self, request: scorer_pb2.SubmitComparisonRequest, context: aio.ServicerContext
    ) -> scorer_pb2.SubmitComparisonResponse:
        check_id(request.rater, "rater")
        check_id(request.winner_id, "winner_id")
        check_id(request.loser_id, "loser_id")
        done = await asyncio.to_thread(
            self.service.submit_comparison, request.rater, request.winner_id, request.loser_id, request.tie
        )
        recorded = Timestamp()
        recorded.FromDatetime(done.recorded_at)
        return scorer_pb2.SubmitComparisonResponse(
            winner_rating=done.winner_rating, loser_rating=done.loser_rating, recorded_at=recorded
        )

    async def FitHead(
        self, request: scorer_pb2.FitHeadRequest, context: aio.ServicerContext
    ) -> scorer_pb2.FitHeadResponse:
        fit = FitRequest(
            holdout_fraction=request.holdout_fraction,
            epochs=request.epochs,
            pairwise_weight=request.pairwise_weight,
            seed=request.seed,
            activate=request.activate,
        )
        # The fit runs (and releases its lock) in the thread, so a cancelled call cannot start a second beside it.
        done = await asyncio.to_thread(self.service.fit_head, fit)
        return scorer_pb2.FitHeadResponse(
            head_version=done.head_version,
            heldout_pairwise_accuracy=done.heldout_pairwise_accuracy,
            train_pairs=done.train_pairs,
            heldout_pairs=done.heldout_pairs,
            rated_images=done.rated_images,
            activated=done.activated,
            baseline_heldout_pairwise_accuracy=done.baseline_heldout_pairwise_accuracy,
            previous_head_version=done.previous_head_version,
        )
