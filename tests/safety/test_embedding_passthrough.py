"""Safety over real gRPC with the tiny CLIP: an item's passed CLIP embedding gives the same probabilities as its
pixels, with no image read and no tower forward; a wrong width is refused naming `items[i].embedding`; images are
read by blob key; concurrent calls share one CLIP batch."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from pony.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from pony_common.blobs import BlobStore, image_key
from pony_common.config import Settings
from pony_common.images import decode_image, image_id
from pony_common.models.clip import ClipImageTower
from pony_common.testing import serve
from services.safety.app import create_service
from services.safety.model import SafetyModel
from tests.samples import png_bytes

IMAGES = [png_bytes((220, 40, 40), noise_seed=1), png_bytes((30, 30, 230), noise_seed=2), png_bytes((5, 5, 5))]


def items(refs: list[common_pb2.ImageRef], embeddings: list[list[float]] | None = None) -> list[safety_pb2.SafetyItem]:
    return [
        safety_pb2.SafetyItem(
            item_id=f"item-{i}",
            image=ref,
            embedding=common_pb2.Embedding(values=embeddings[i]) if embeddings else None,
        )
        for i, ref in enumerate(refs)
    ]


def test_passed_embeddings_give_the_pixel_verdicts_without_reading_the_image(model_settings: Settings) -> None:
    tower = ClipImageTower.shared(model_settings.model_path("safety"))
    store = BlobStore(model_settings.blob_url)
    keys = [store.put(image_key(image_id(b), "png"), b) for b in IMAGES]
    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = safety_pb2_grpc.SafetyStub(ch)
        inline = stub.Check(safety_pb2.CheckRequest(items=items([common_pb2.ImageRef(data=b) for b in IMAGES])))
        by_key = stub.Check(safety_pb2.CheckRequest(items=items([common_pb2.ImageRef(uri=k) for k in keys])))
        embeddings = tower.embed([decode_image(b) for b in IMAGES]).tolist()
        before = tower.forward_images
        # The keys name no blob: an item with its embedding is classified without its image being read.
        unread = [common_pb2.ImageRef(uri=f"images/none/{i}.png", image_id=image_id(b)) for i, b in enumerate(IMAGES)]
        passed = stub.Check(safety_pb2.CheckRequest(items=items(unread, embeddings)))
        assert tower.forward_images == before
        hostile = [common_pb2.ImageRef(uri="images/none/0.png", image_id="id\x00"), *unread[1:]]
        (bad, *rest) = stub.Check(safety_pb2.CheckRequest(items=items(hostile, embeddings))).results
        assert bad.error.field == "items[0].image.image_id" and not any(r.HasField("error") for r in rest)

        wrong = [embeddings[0], [0.1] * 768, embeddings[2]]
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(safety_pb2.CheckRequest(items=items(unread, wrong)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("items[1].embedding:")

    for a, k, p, blob in zip(inline.results, by_key.results, passed.results, IMAGES, strict=True):
        assert not a.HasField("error") and not k.HasField("error") and not p.HasField("error")
        assert a.image_id == k.image_id == p.image_id == image_id(blob)
        assert len(a.rating_scores) == 3
        assert list(k.rating_scores) == pytest.approx(list(a.rating_scores), abs=1e-6)
        assert list(p.rating_scores) == pytest.approx(list(a.rating_scores), abs=1e-5)
        assert (p.rating, p.decision) == (a.rating, a.decision)


def test_concurrent_checks_share_one_clip_batch(model_settings: Settings) -> None:
    settings = model_settings.replace(safety_batch_size=len(IMAGES), safety_batch_delay_ms=600_000)
    name = {"model": "safety"}
    count = REGISTRY.get_sample_value("pony_model_batch_size_count", name) or 0.0
    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = safety_pb2_grpc.SafetyStub(ch)
        futures = [
            stub.Check.future(safety_pb2.CheckRequest(items=items([common_pb2.ImageRef(data=b)])), timeout=120)
            for b in IMAGES
        ]
        replies = [f.result() for f in futures]
    assert REGISTRY.get_sample_value("pony_model_batch_size_count", name) - count == 1
    tower = ClipImageTower.shared(settings.model_path("safety"))
    alone = SafetyModel(settings)
    alone.load()
    for blob, reply in zip(IMAGES, replies, strict=True):
        (result,) = reply.results
        assert result.image_id == image_id(blob)
        # The head on this image's embedding alone: what merging must not change.
        want = alone.predict_embeddings(tower.embed([decode_image(blob)]))[0]
        assert list(result.rating_scores) == pytest.approx(want.tolist(), abs=1e-5)
