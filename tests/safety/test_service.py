"""`pony.v1.Safety` over gRPC with the tiny CLIP + NSFW head: checks, the sampler's call, codex reload, bad input."""

from __future__ import annotations

import io
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from pony.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from pony_common.models.clip import ClipImageTower
from pony_common.models.heads import load_head
from pony_common.testing import serve
from services.safety.app import create_service
from services.safety.codex import CodexCharacter
from services.safety.policy import SafetyInput
from services.safety.service import SafetyService
from services.safety.store import CodexStore

CHARACTERS = [
    CodexCharacter("Twilight Sparkle", ("Princess Twilight",), "My Little Pony", "adult"),
    CodexCharacter("Sweetie Belle", (), "My Little Pony", "minor"),
]


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def test_classifier_is_the_nsfw_head_over_the_shared_clip_tower(model_settings: Settings) -> None:
    service = SafetyService(model_settings)
    service.model.load()
    images = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (20, 200, 20))]
    probs = service.model.predict(images)
    tower = ClipImageTower.shared(model_settings.model_path("safety"))
    assert service.model.tower is tower
    head, info = load_head(f"{model_settings.models_dir}/heads/nsfw")
    with torch.inference_mode():
        expected = torch.softmax(head(tower.embed(images)), dim=-1).numpy()
    order = [list(info.labels).index(x) for x in ("safe", "questionable", "explicit")]
    assert np.allclose(probs, expected[:, order], atol=1e-6)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    verdicts = service.check([SafetyInput(image=img, image_id=str(i)) for i, img in enumerate(images)])
    assert [v.rating_scores for v in verdicts] == [pytest.approx(tuple(p)) for p in probs]


def expect_invalid(call: Callable[[], object], field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_check_over_grpc_with_images_prompts_and_codex_reload(model_settings: Settings) -> None:
    # explicit_threshold 0: every image is rated explicit by the classifier, so image-driven rules are exercised.
    settings = model_settings.replace(safety_explicit_threshold=0.0, safety_max_batch=8)
    store = CodexStore(catalog_for(settings.database_url))
    store.import_characters(CHARACTERS)

    with (
        serve(settings, create_service(settings), ready_timeout=60) as served,
        grpc.insecure_channel(served.address) as ch,
    ):
        stub = safety_pb2_grpc.SafetyStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        items = [
            # What the sampler sends: the generated image and its prompt.
            safety_pb2.SafetyItem(
                item_id="gen-1",
                image=common_pb2.ImageRef(data=png((200, 30, 30))),
                caption="score_9, source_pony, Sweetie Belle, standing in a field",
            ),
            safety_pb2.SafetyItem(item_id="txt-1", caption="twilight_sparkle, rating_safe", tags=["solo"]),
            safety_pb2.SafetyItem(item_id="bad-image", image=common_pb2.ImageRef(data=b"not an image")),
            safety_pb2.SafetyItem(item_id="empty"),
            safety_pb2.SafetyItem(item_id="who", characters=["Rarity"], tags=["loli"]),
        ]
        response = stub.Check(safety_pb2.CheckRequest(items=items))
        gen, txt, bad, empty, who = response.results
        assert gen.decision == safety_pb2.DECISION_BLOCK and gen.rating == common_pb2.RATING_EXPLICIT
        assert [r.rule_id for r in gen.reasons] == ["codex.minor_explicit"]
        assert "codex v1" in gen.reasons[0].message and gen.codex_version == "1"
        assert len(gen.rating_scores) == 3 and gen.image_id and gen.matched_characters == ["Sweetie Belle"]
        assert "classifier.explicit" in gen.flags
        assert txt.decision == safety_pb2.DECISION_ALLOW and txt.rating == common_pb2.RATING_SAFE
        assert list(txt.rating_scores) == [] and txt.matched_characters == ["Twilight Sparkle"]
        assert bad.error.field == "items[2].image" and bad.error.reason == "invalid_image"
        assert empty.error.field == "items[3]" and empty.error.reason == "invalid_argument"
        assert who.decision == safety_pb2.DECISION_BLOCK and [r.rule_id for r in who.reasons] == ["tags.blocked"]
        assert list(who.unknown_characters) == ["Rarity"] and "codex.unknown_character" in who.flags
        assert gen.provenance.model_version and "codex:v1" in gen.provenance.component_version

        # A codex import shows up on the next call, with its version in the reasons.
        store.import_characters([CodexCharacter("Rarity", (), "My Little Pony", "minor")], merge=True)
        again = stub.Check(
            safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(characters=["rarity"], caption="nude")])
        )
        (r,) = again.results
        assert r.codex_version == "2" and not r.unknown_characters
        assert [x.rule_id for x in r.reasons] == ["codex.minor_explicit"] and "codex v2" in r.reasons[0].message

        expect_invalid(lambda: stub.Check(safety_pb2.CheckRequest()), "items")
        expect_invalid(lambda: stub.Check(safety_pb2.CheckRequest(items=[items[1]] * 9)), "items")
        ready = health.Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert ready.status == health_pb2.HealthCheckResponse.SERVING
        ok = stub.Check(safety_pb2.CheckRequest(items=[items[1]]))
        assert ok.results[0].decision == safety_pb2.DECISION_ALLOW


def test_a_configured_blocked_tag_list_replaces_the_default(model_settings: Settings, tmp_path) -> None:
    path = tmp_path / "blocked.txt"
    path.write_text("# house rules\nforbidden_thing\n\n", encoding="utf-8")
    service = SafetyService(model_settings.replace(safety_blocked_tags_path=str(path)))
    service.model.load()
    a, b = service.check([SafetyInput(tags=("Forbidden Thing",)), SafetyInput(tags=("loli",))])
    assert a.blocked and [r.rule_id for r in a.reasons] == ["tags.blocked"]
    assert not b.blocked
