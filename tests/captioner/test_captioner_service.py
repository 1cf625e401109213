"""The captioner end to end over gRPC with the tiny VLM: unary and streaming, per-item errors, bad requests."""

from __future__ import annotations

import grpc
import pytest

from pony.v1 import captioner_pb2, captioner_pb2_grpc, common_pb2
from pony_common.config import Settings
from pony_common.testing import serve
from services.captioner.app import create_service
from services.captioner.client import CaptionerClient
from tests.samples import RANDOM_BYTES, SERVING, bomb_png, png_bytes, readiness

K = captioner_pb2
TOKENS = 12  # the tiny model's captions are word salad; a few tokens say as much as many


@pytest.fixture(scope="module")
def captioner(tiny_models, tmp_path_factory: pytest.TempPathFactory):
    blocklist = tmp_path_factory.mktemp("lists") / "artists.txt"
    blocklist.write_text("Sparkle\n", encoding="utf-8")
    settings = Settings.from_env(
        {},
        state_dir=str(tmp_path_factory.mktemp("state")),
        models_dir=str(tiny_models),
        captioner_batch_size=2,
        artist_blocklist_path=str(blocklist),
    )
    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as channel:
        client = CaptionerClient(settings, served.address)
        yield captioner_pb2_grpc.CaptionerStub(channel), channel, client
        client.reset()  # closes the process-wide channel to this test server


def item(data: bytes, **kw: object) -> captioner_pb2.CaptionItem:
    return captioner_pb2.CaptionItem(image=common_pb2.ImageRef(data=data), **kw)


def test_caption_batch_gives_each_kind_with_provenance_and_the_character_names(captioner) -> None:
    stub, *_ = captioner
    request = captioner_pb2.CaptionRequest(
        items=[
            item(
                png_bytes((200, 40, 40)), item_id="a", tags=["pony", "artist:nobody"], characters=["twilight_sparkle"]
            ),
            item(png_bytes((0, 0, 0), noise_seed=3), item_id="b", kinds=[K.CAPTION_KIND_SHORT, K.CAPTION_KIND_STYLE]),
            item(
                png_bytes((10, 90, 200)), item_id="c", kinds=[K.CAPTION_KIND_LONG], characters=["Rainbow Dash", "Spike"]
            ),
        ],
        max_new_tokens=TOKENS,
    )
    reply = stub.Caption(request, timeout=120)
    assert [r.item_id for r in reply.results] == ["a", "b", "c"]
    a, b, c = reply.results
    assert not any(r.HasField("error") for r in reply.results)
    assert [x.kind for x in a.captions] == [K.CAPTION_KIND_SHORT, K.CAPTION_KIND_MEDIUM, K.CAPTION_KIND_LONG,
                                           K.CAPTION_KIND_STYLE]  # fmt: skip
    assert [x.kind for x in b.captions] == [K.CAPTION_KIND_SHORT, K.CAPTION_KIND_STYLE]
    assert [x.kind for x in c.captions] == [K.CAPTION_KIND_LONG]
    for caption in [*a.captions, *b.captions, *c.captions]:
        assert caption.text and caption.text == " ".join(caption.text.split())
        assert caption.provenance.model.endswith("vlm")
        assert len(caption.provenance.model_version) == 12
        assert caption.provenance.component_version.startswith("captions-1+")
    for caption in a.captions[:3]:
        assert "Twilight Sparkle" in caption.text
    assert "Twilight Sparkle" not in a.captions[3].text  # style captions name no one
    assert "Rainbow Dash" in c.captions[0].text and "Spike" in c.captions[0].text
    assert len(a.image_id) == 64 and a.image_id != b.image_id


def test_bad_images_are_item_errors_and_the_rest_of_the_batch_is_captioned(captioner) -> None:
    stub, channel, _ = captioner
    request = captioner_pb2.CaptionRequest(
        items=[
            item(b"", item_id="empty"),
            item(png_bytes((1, 2, 3)), item_id="good", kinds=[K.CAPTION_KIND_SHORT]),
            item(RANDOM_BYTES, item_id="noise"),
            item(bomb_png(), item_id="bomb"),
            captioner_pb2.CaptionItem(item_id="none"),
        ],
        max_new_tokens=TOKENS,
    )
    reply = stub.Caption(request, timeout=120)
    by_id = {r.item_id: r for r in reply.results}
    assert by_id["good"].captions and not by_id["good"].HasField("error")
    for name, index in (("empty", 0), ("noise", 2), ("bomb", 3), ("none", 4)):
        error = by_id[name].error
        assert error.reason == "invalid_image" and error.field == f"items[{index}].image" and error.message
        assert not by_id[name].captions
    assert readiness(channel) == SERVING


def test_stream_sends_each_result_with_progress(captioner) -> None:
    stub, *_ = captioner
    request = captioner_pb2.CaptionStreamRequest(
        items=[item(png_bytes((i * 50, 0, 0)), item_id=str(i), kinds=[K.CAPTION_KIND_SHORT]) for i in range(3)]
        + [item(b"not an image", item_id="bad")],
        max_new_tokens=TOKENS,
    )
    messages = list(stub.CaptionStream(request, timeout=120))
    assert [(m.done, m.total) for m in messages] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [m.result.item_id for m in messages] == ["0", "1", "2", "bad"]
    assert all(m.result.captions[0].kind == K.CAPTION_KIND_SHORT for m in messages[:3])
    assert messages[3].result.error.field == "items[3].image"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (captioner_pb2.CaptionRequest(), "items"),
        (captioner_pb2.CaptionRequest(items=[item(png_bytes((1, 1, 1)), kinds=[99])]), "items[0].kinds[0]"),
        (
            captioner_pb2.CaptionRequest(
                items=[item(png_bytes((1, 1, 1))), item(png_bytes((1, 1, 1)), kinds=[K.CAPTION_KIND_UNSPECIFIED])]
            ),
            "items[1].kinds[0]",
        ),
        (captioner_pb2.CaptionRequest(items=[item(png_bytes((1, 1, 1)))], max_new_tokens=-1), "max_new_tokens"),
        (captioner_pb2.CaptionRequest(items=[item(png_bytes((1, 1, 1)), tags=["x" * 300])]), "items[0].tags[0]"),
        (captioner_pb2.CaptionRequest(items=[item(png_bytes((1, 1, 1)))] * 300), "items"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field_and_the_server_stays_ready(
    captioner, request_: captioner_pb2.CaptionRequest, field: str
) -> None:
    stub, channel, _ = captioner
    with pytest.raises(grpc.RpcError) as err:
        stub.Caption(request_, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")
    stream_request = captioner_pb2.CaptionStreamRequest(items=request_.items, max_new_tokens=request_.max_new_tokens)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.CaptionStream(stream_request, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")
    assert readiness(channel) == SERVING


def test_a_call_past_its_deadline_ends_and_the_server_keeps_serving(captioner) -> None:
    stub, channel, _ = captioner
    items = [item(png_bytes((i, 2 * i, 3 * i), noise_seed=i)) for i in range(8)]
    with pytest.raises(grpc.RpcError) as err:
        stub.Caption(captioner_pb2.CaptionRequest(items=items, max_new_tokens=64), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert readiness(channel) == SERVING
    reply = stub.Caption(
        captioner_pb2.CaptionRequest(items=items[:1], max_new_tokens=4), timeout=120
    )  # the backend stopped the expired call between batches; this one is served
    assert reply.results[0].captions


def test_the_typed_client_captions_a_batch(captioner) -> None:
    _, _, client = captioner
    request = captioner_pb2.CaptionRequest(
        items=[item(png_bytes((5, 5, 5)), item_id="x", kinds=[K.CAPTION_KIND_SHORT]), item(b"", item_id="y")],
        max_new_tokens=TOKENS,
    )
    reply = client.caption(request)
    x, y = reply.results
    assert [c.kind for c in x.captions] == [K.CAPTION_KIND_SHORT] and not x.HasField("error")
    assert y.error.reason == "invalid_image" and y.error.field == "items[1].image"
    with pytest.raises(grpc.RpcError) as err:
        client.caption(captioner_pb2.CaptionRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
