"""The scorer with LAION's real improved-aesthetic-predictor head: ScoreEmbeddings equals the head module directly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.config import Settings
from pony_common.models.heads import load_head
from pony_common.testing import serve
from services.scorer.app import create_service
from tests.conftest import LAION_HEAD_PATH
from tests.samples import png_bytes

LAION_HEAD = Path(os.environ.get("PONY_TEST_LAION_HEAD", str(LAION_HEAD_PATH)))


@pytest.fixture(scope="module")
def clip_768(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CLIPModel whose projection is 768 wide, like ViT-L/14's (random weights, seeded)."""
    out = tmp_path_factory.mktemp("clip768")
    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=768,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.mark.skipif(not LAION_HEAD.is_file(), reason=f"LAION head not present at {LAION_HEAD}")
def test_scorer_with_the_laion_pth_scores_embeddings_exactly_like_the_head_module(
    settings: Settings, clip_768: Path
) -> None:
    settings = settings.replace(scorer_model=str(clip_768), scorer_head=str(LAION_HEAD))
    head, info = load_head(LAION_HEAD)
    generator = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(16, 768, generator=generator), dim=-1)
    with torch.inference_mode():
        expected_raw = head(x)[:, 0]
    expected_score = ((expected_raw - 1.0) / 9.0).clamp(0, 1)
    version = hashlib.sha256(LAION_HEAD.read_bytes()).hexdigest()[:12]

    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        reply = stub.ScoreEmbeddings(
            scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=v) for v in x.tolist()]),
            timeout=30,
        )
        raw = torch.tensor([r.raw for r in reply.results])
        score = torch.tensor([r.score for r in reply.results])
        torch.testing.assert_close(raw, expected_raw, rtol=0, atol=1e-5)
        torch.testing.assert_close(score, expected_score, rtol=0, atol=1e-6)
        assert {r.provenance.component_version for r in reply.results} == {version}
        assert info.version == version

        images = stub.Score(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(data=png_bytes((9, 9, 9)))]))
        assert images.results[0].provenance.component_version == version
        assert 0.0 <= images.results[0].score <= 1.0
