"""The scorer end to end over gRPC with the tiny CLIP and head: scores, tags, embeddings, bad input."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.config import Settings
from pony_common.models.clip import ClipImageTower
from pony_common.models.heads import load_head
from pony_common.tags import cumulative_tags_for_score, score_tag
from pony_common.testing import serve
from services.scorer.app import create_service
from tests.samples import RANDOM_BYTES, SERVING, bomb_png, png_bytes, readiness


@pytest.fixture
def scorer(model_settings: Settings):
    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        yield scorer_pb2_grpc.ScorerStub(ch), ch


def refs(*blobs: bytes) -> list[common_pb2.ImageRef]:
    return [common_pb2.ImageRef(data=b) for b in blobs]


def test_score_returns_raw_calibrated_score_and_tags_matching_the_head(scorer, model_settings: Settings) -> None:
    stub, _ = scorer
    images = [png_bytes((200, 30, 30)), png_bytes((0, 0, 0), noise_seed=1), png_bytes((10, 200, 90), (64, 64))]
    reply = stub.Score(scorer_pb2.ScoreRequest(images=refs(*images)), timeout=30)
    assert len(reply.results) == 3
    head, info = load_head(model_settings.head_path("scorer"))
    tower = ClipImageTower.shared(model_settings.model_path("scorer"))
    from pony_common.images import decode_image

    emb = tower.embed([decode_image(b) for b in images])
    with torch.inference_mode():
        raw = head(emb)[:, 0]
    expected = info.calibrate(raw)
    for result, r, s in zip(reply.results, raw.tolist(), expected.tolist(), strict=True):
        assert not result.HasField("error")
        assert len(result.image_id) == 64
        assert result.raw == pytest.approx(r, abs=1e-5)
        assert 0.0 <= result.score <= 1.0
        assert result.score == pytest.approx(s, abs=1e-5)
        assert result.score_tag == score_tag(result.score)
        assert result.cumulative_tags == cumulative_tags_for_score(result.score)
        assert result.cumulative_tags.startswith(result.score_tag)  # the V6 tags true of the image
        assert result.provenance.component_version == info.version
        assert result.provenance.model_version
        assert not result.embedding  # only with include_embeddings
    assert len({r.image_id for r in reply.results}) == 3


def test_embed_returns_unit_vectors_that_rescore_to_the_same_scores(scorer) -> None:
    stub, _ = scorer
    images = refs(png_bytes((250, 250, 0)), png_bytes((0, 0, 0), noise_seed=7))
    embedded = stub.Embed(scorer_pb2.EmbedRequest(images=images), timeout=30)
    assert embedded.dim == 64 and embedded.provenance.model
    vectors = [list(r.embedding) for r in embedded.results]
    for v in vectors:
        assert len(v) == 64
        assert math.sqrt(sum(x * x for x in v)) == pytest.approx(1.0, abs=1e-4)
    scored = stub.Score(scorer_pb2.ScoreRequest(images=images, include_embeddings=True), timeout=30)
    assert [list(r.embedding) for r in scored.results] == vectors
    rescored = stub.ScoreEmbeddings(
        scorer_pb2.ScoreEmbeddingsRequest(
            embeddings=[common_pb2.Embedding(values=v) for v in vectors],
            image_ids=[r.image_id for r in embedded.results],
        ),
        timeout=30,
    )
    for a, b in zip(scored.results, rescored.results, strict=True):
        assert a.image_id == b.image_id
        assert a.raw == pytest.approx(b.raw, abs=1e-5)
        assert a.score_tag == b.score_tag


def test_bad_images_in_a_batch_get_item_errors_naming_the_field_and_the_rest_is_scored(scorer) -> None:
    stub, channel = scorer
    request = scorer_pb2.ScoreRequest(
        images=[
            common_pb2.ImageRef(data=png_bytes((1, 2, 3))),
            common_pb2.ImageRef(data=b""),
            common_pb2.ImageRef(data=RANDOM_BYTES),
            common_pb2.ImageRef(data=bomb_png()),
            common_pb2.ImageRef(uri="/no/such/image.png"),
            common_pb2.ImageRef(),
        ]
    )
    reply = stub.Score(request, timeout=30)
    assert not reply.results[0].HasField("error") and reply.results[0].score_tag.startswith("score_")
    fields = [r.error.field for r in reply.results[1:]]
    assert fields == ["images[1]", "images[2]", "images[3]", "images[4].uri", "images[5]"]
    assert all(r.error.reason == "invalid_image" and r.error.message for r in reply.results[1:])
    assert "pixels" in reply.results[3].error.message
    embed = stub.Embed(scorer_pb2.EmbedRequest(images=request.images[:3]), timeout=30)
    assert [r.HasField("error") for r in embed.results] == [False, True, True]
    assert readiness(channel) == SERVING


@pytest.mark.parametrize(
    ("call", "request_", "field"),
    [
        ("Score", scorer_pb2.ScoreRequest(), "images"),
        ("Embed", scorer_pb2.EmbedRequest(), "images"),
        ("ScoreEmbeddings", scorer_pb2.ScoreEmbeddingsRequest(), "embeddings"),
        (
            "ScoreEmbeddings",
            scorer_pb2.ScoreEmbeddingsRequest(
                embeddings=[common_pb2.Embedding(values=[0.1] * 64), common_pb2.Embedding(values=[0.1] * 768)]
            ),
            "embeddings[1]",
        ),
        (
            "ScoreEmbeddings",
            scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=[math.nan] * 64)]),
            "embeddings[0]",
        ),
        (
            "ScoreEmbeddings",
            scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=[0.0] * 64)]),
            "embeddings[0]",
        ),
        (
            "ScoreEmbeddings",
            scorer_pb2.ScoreEmbeddingsRequest(
                embeddings=[common_pb2.Embedding(values=[0.1] * 64)], image_ids=["a", "b"]
            ),
            "image_ids",
        ),
        ("FitHead", scorer_pb2.FitHeadRequest(holdout_fraction=1.5), "holdout_fraction"),
        ("FitHead", scorer_pb2.FitHeadRequest(epochs=-1), "epochs"),
        ("FitHead", scorer_pb2.FitHeadRequest(pairwise_weight=-2), "pairwise_weight"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field_and_the_server_stays_ready(
    scorer, call: str, request_: object, field: str
) -> None:
    stub, channel = scorer
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, call)(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")
    assert readiness(channel) == SERVING
    ok = stub.ScoreEmbeddings(
        scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=[0.1] * 64)]), timeout=30
    )
    assert ok.results[0].score_tag.startswith("score_")


def test_preference_rpcs_store_comparisons_update_elo_and_map_errors(scorer, model_settings: Settings) -> None:
    import hashlib

    from pony_common.catalog.db import catalog_for
    from pony_common.catalog.models import ImageRow

    stub, channel = scorer
    ids = sorted(hashlib.sha256(f"rpc-{i}".encode()).hexdigest() for i in range(3))
    with catalog_for(model_settings.database_url).session() as s:
        s.add_all(ImageRow(id=i, blob_key=f"images/{i}.png") for i in ids)
    pair = stub.NextPair(scorer_pb2.NextPairRequest(rater="ann"), timeout=30)
    assert {pair.image_a, pair.image_b} <= set(ids) and pair.image_a != pair.image_b
    assert pair.rating_a == pair.rating_b == 1500.0
    done = stub.SubmitComparison(
        scorer_pb2.SubmitComparisonRequest(rater="ann", winner_id=pair.image_a, loser_id=pair.image_b), timeout=30
    )
    assert done.winner_rating == pytest.approx(1516) and done.loser_rating == pytest.approx(1484)
    assert done.recorded_at.seconds > 0
    again = stub.SubmitComparison(
        scorer_pb2.SubmitComparisonRequest(rater="ann", winner_id=pair.image_a, loser_id=pair.image_b), timeout=30
    )
    assert (again.winner_rating, again.recorded_at) == (done.winner_rating, done.recorded_at)
    following = stub.NextPair(scorer_pb2.NextPairRequest(rater="ann"), timeout=30)
    assert {following.image_a, following.image_b} != {pair.image_a, pair.image_b}
    cases = [
        (dict(rater="ann", winner_id=pair.image_b, loser_id=pair.image_a), grpc.StatusCode.ALREADY_EXISTS, ""),
        (dict(rater="", winner_id=ids[0], loser_id=ids[1]), grpc.StatusCode.INVALID_ARGUMENT, "rater:"),
        (dict(rater="ann", winner_id=ids[0], loser_id=ids[0]), grpc.StatusCode.INVALID_ARGUMENT, "loser_id:"),
        (dict(rater="ann", winner_id="f" * 64, loser_id=ids[0]), grpc.StatusCode.NOT_FOUND, "winner_id:"),
    ]
    for fields, code, prefix in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitComparison(scorer_pb2.SubmitComparisonRequest(**fields), timeout=30)
        assert err.value.code() == code
        assert err.value.details().startswith(prefix)
    with pytest.raises(grpc.RpcError) as err:
        stub.NextPair(scorer_pb2.NextPairRequest(rater=""), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("rater:")
    assert readiness(channel) == SERVING
