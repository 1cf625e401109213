"""Scorer, style tagger and safety started in one process share one CLIP image tower (one copy of the weights)."""

from __future__ import annotations

import gc
import io
import shutil
from pathlib import Path

import grpc
import numpy as np
from PIL import Image
from transformers import CLIPVisionModel

from pony.v1 import (
    common_pb2,
    safety_pb2,
    safety_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    style_tagger_pb2,
    style_tagger_pb2_grpc,
)
from pony_common.config import Settings
from pony_common.models.clip import ClipImageTower
from services.stack.stack_thread import StackThread


def vision_towers() -> int:
    """How many CLIP vision models are alive in this process."""
    gc.collect()
    return sum(type(o) is CLIPVisionModel for o in gc.get_objects())


def test_scorer_style_tagger_and_safety_in_one_process_share_one_tower(
    settings: Settings, tiny_models: Path, tmp_path: Path
) -> None:
    # A models folder of our own, so no other test's tower for the same path can be counted here.
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "clip", models / "clip")
    shutil.copytree(tiny_models / "heads", models / "heads")
    settings = settings.replace(models_dir=str(models))
    clip_path = str(models / "clip")
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 128, 128)).save(buf, format="PNG")
    image = common_pb2.ImageRef(data=buf.getvalue())

    before = vision_towers()

    stack = StackThread(settings, ["scorer", "style-tagger", "safety"], ready_timeout=120)
    try:
        # Each definition's `load` is its model's: ScorerModel, StyleTaggerModel, SafetyModel.
        scorer = stack.running["scorer"].definition.load.__self__
        tagger = stack.running["style-tagger"].definition.load.__self__
        checker = stack.running["safety"].definition.load.__self__
        assert scorer.tower is tagger.encoder is checker.tower
        assert tagger.encoder is ClipImageTower.shared(clip_path)
        assert vision_towers() == before + 1

        s = stack.settings
        with (
            grpc.insecure_channel(s.scorer_addr) as a,
            grpc.insecure_channel(s.style_tagger_addr) as b,
            grpc.insecure_channel(s.safety_addr) as c,
        ):
            by_scorer = scorer_pb2_grpc.ScorerStub(a).Embed(scorer_pb2.EmbedRequest(images=[image]), timeout=60)
            by_tagger = style_tagger_pb2_grpc.StyleTaggerStub(b).Embed(
                style_tagger_pb2.StyleTaggerEmbedRequest(images=[image]), timeout=60
            )
            checked = safety_pb2_grpc.SafetyStub(c).Check(
                safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(image=image)]), timeout=60
            )
        assert np.array_equal(by_scorer.results[0].embedding, by_tagger.results[0].embedding)
        assert by_scorer.provenance.model_version == by_tagger.provenance.model_version
        assert checked.results[0].provenance.model_version == by_tagger.provenance.model_version
        assert vision_towers() == before + 1
    finally:
        stack.close()
