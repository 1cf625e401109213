"""Safety over real gRPC with the tiny CLIP: an image sent as raw RGB pixels (`ImageRef.raw`, what the sampler sends)
gets the verdict its PNG gets, nothing decoded; raw pixels whose length contradicts width * height * 3 fail the call
(INVALID_ARGUMENT naming `items[i].image.raw.pixels`); a raw image over the pixel limit is refused like an encoded
one; the shared loader (`ImageResolver`) reads raw refs for every service."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from pony.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.imagerefs import ImageResolver
from pony_common.images import decode_image, image_id
from pony_common.testing import serve
from services.safety.app import create_service
from tests.samples import png_bytes

PNGS = [png_bytes((220, 40, 40), noise_seed=1), png_bytes((30, 30, 230), noise_seed=2), png_bytes((5, 5, 5))]


def raw_ref(png: bytes) -> common_pb2.ImageRef:
    pixels = np.asarray(decode_image(png))
    height, width, _ = pixels.shape
    return common_pb2.ImageRef(raw=common_pb2.RawImage(width=width, height=height, pixels=pixels.tobytes()))


def check(stub: safety_pb2_grpc.SafetyStub, refs: list[common_pb2.ImageRef]) -> list[safety_pb2.SafetyResult]:
    items = [safety_pb2.SafetyItem(item_id=str(i), image=ref, caption="a pony") for i, ref in enumerate(refs)]
    return list(stub.Check(safety_pb2.CheckRequest(items=items), timeout=120).results)


def test_raw_pixels_get_the_verdict_of_their_png(model_settings: Settings) -> None:
    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = safety_pb2_grpc.SafetyStub(ch)
        encoded = check(stub, [common_pb2.ImageRef(data=png) for png in PNGS])
        raw = check(stub, [raw_ref(png) for png in PNGS])
        # The caller's id (the sampler passes its PNG's) is echoed; without one the id is the pixels' hash.
        named = check(stub, [common_pb2.ImageRef(raw=raw_ref(PNGS[0]).raw, image_id=image_id(PNGS[0]))])
    for a, b in zip(encoded, raw, strict=True):
        assert not a.HasField("error") and not b.HasField("error")
        assert (b.rating, b.decision, b.flags) == (a.rating, a.decision, a.flags)
        assert list(b.rating_scores) == pytest.approx(list(a.rating_scores), abs=1e-6)
    assert raw[0].image_id == image_id(raw_ref(PNGS[0]).raw.pixels)
    assert named[0].image_id == image_id(PNGS[0])


@pytest.mark.parametrize(
    ("width", "height", "extra", "field"),
    [
        (4, 4, -1, "items[1].image.raw.pixels"),
        (4, 4, 3, "items[1].image.raw.pixels"),
        (0, 4, 0, "items[1].image.raw.width"),
    ],
)
def test_bad_raw_sizes_are_invalid_argument(
    model_settings: Settings, width: int, height: int, extra: int, field: str
) -> None:
    pixels = bytes(max(0, width * height * 3 + extra))
    bad = common_pb2.ImageRef(raw=common_pb2.RawImage(width=width, height=height, pixels=pixels))
    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = safety_pb2_grpc.SafetyStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            check(stub, [raw_ref(PNGS[0]), bad])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")


def test_raw_images_over_the_pixel_limit_are_refused_like_encoded_ones(model_settings: Settings) -> None:
    settings = model_settings.replace(max_image_pixels=100)
    big = common_pb2.ImageRef(raw=common_pb2.RawImage(width=16, height=16, pixels=bytes(16 * 16 * 3)))
    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = safety_pb2_grpc.SafetyStub(ch)
        encoded, raw = check(stub, [common_pb2.ImageRef(data=png_bytes((1, 2, 3), size=(16, 16))), big])
    assert encoded.error.reason == raw.error.reason == "invalid_image"
    assert raw.error.field == "items[1].image" and "more than 100 pixels" in raw.error.message


def test_the_shared_loader_reads_raw_refs(settings: Settings) -> None:
    resolver = ImageResolver(settings)
    loaded = resolver.load(raw_ref(PNGS[1]), "image")
    assert np.array_equal(np.asarray(loaded.image), np.asarray(decode_image(PNGS[1])))
    short = common_pb2.ImageRef(raw=common_pb2.RawImage(width=2, height=2, pixels=bytes(11)))
    with pytest.raises(InvalidArgument) as err:
        resolver.load(short, "images[0]")
    assert err.value.field == "images[0].raw.pixels"
