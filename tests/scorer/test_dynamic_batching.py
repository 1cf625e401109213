"""The scorer over real gRPC merges concurrent calls into CLIP batches (Triton-style dynamic batching) with every
call's results its own, and reads images by blob key as well as inline bytes."""

from __future__ import annotations

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.blobs import BlobStore, image_key
from pony_common.config import Settings
from pony_common.images import decode_image, image_id
from pony_common.models.clip import ClipImageTower
from pony_common.models.heads import load_head
from pony_common.testing import serve
from services.scorer.app import create_service
from tests.samples import png_bytes

CALLS = 3
PER_CALL = 2


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": "scorer"}) or 0.0


def expected_raw(settings: Settings, blobs: list[bytes]) -> tuple[list[float], torch.Tensor]:
    """Each image embedded ALONE by the tower and scored by the head: what a batch must not change."""
    tower = ClipImageTower.shared(settings.model_path("scorer"))
    head, _ = load_head(settings.head_path("scorer"))
    embeddings = torch.cat([tower.embed([decode_image(b)]) for b in blobs])
    with torch.inference_mode():
        return head(embeddings)[:, 0].tolist(), embeddings


def test_concurrent_calls_share_one_model_batch_and_keep_their_own_results(model_settings: Settings) -> None:
    # A batch starts only when full (the delay is far longer than the test): the three calls must be merged.
    settings = model_settings.replace(scorer_batch_size=CALLS * PER_CALL, scorer_batch_delay_ms=600_000)
    calls = [
        [png_bytes((40 * c, 200 - 30 * i, 90), noise_seed=10 * c + i) for i in range(PER_CALL)] for c in range(CALLS)
    ]
    before = (sample("pony_model_batch_size_count"), sample("pony_model_batch_size_sum"))
    merged_before = sample("pony_model_requests_merged_total")
    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        futures = [
            stub.Score.future(
                scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(data=b) for b in blobs], include_embeddings=True),
                timeout=120,
            )
            for blobs in calls
        ]
        replies = [f.result() for f in futures]
    assert sample("pony_model_batch_size_count") - before[0] == 1
    assert sample("pony_model_batch_size_sum") - before[1] == CALLS * PER_CALL
    assert sample("pony_model_requests_merged_total") - merged_before == CALLS
    for blobs, reply in zip(calls, replies, strict=True):
        raw, embeddings = expected_raw(settings, blobs)
        assert [r.image_id for r in reply.results] == [image_id(b) for b in blobs]
        for result, r, e in zip(reply.results, raw, embeddings.tolist(), strict=True):
            assert not result.HasField("error")
            assert result.raw == pytest.approx(r, abs=1e-5)
            assert list(result.embedding) == pytest.approx(e, abs=1e-5)


def test_images_are_read_by_blob_key_and_inline_bytes_alike(model_settings: Settings) -> None:
    blobs = [png_bytes((200, 10, 10), noise_seed=3), png_bytes((10, 10, 200), noise_seed=4)]
    store = BlobStore(model_settings.blob_url)
    keys = [store.put(image_key(image_id(b), "png"), b) for b in blobs]
    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = scorer_pb2_grpc.ScorerStub(ch)
        by_key = stub.Score(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(uri=k) for k in keys]), timeout=60)
        inline = stub.Score(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(data=b) for b in blobs]), timeout=60)
        missing = stub.Score(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(uri="images/no/such.png")]))
    assert [r.image_id for r in by_key.results] == [image_id(b) for b in blobs]
    for a, b in zip(by_key.results, inline.results, strict=True):
        assert not a.HasField("error")
        assert a.raw == pytest.approx(b.raw, abs=1e-6)
    assert missing.results[0].error.field == "images[0].uri"
