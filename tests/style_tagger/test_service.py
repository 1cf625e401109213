"""`pony.v1.StyleTagger` over real gRPC with the tiny CLIP: embed, store, fit, tag, similar styles; bad input."""

from __future__ import annotations

import io
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from pony.v1 import common_pb2, style_tagger_pb2, style_tagger_pb2_grpc
from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from pony_common.testing import serve
from services.style_tagger.app import create_service
from services.style_tagger.clusters import EmbeddingTable
from services.style_tagger.model import VitImageEncoder
from services.style_tagger.service import StyleTaggerService
from services.style_tagger.store import StyleStore
from tests.style_tagger.synthetic import add_images

SOLID = [(255, 0, 0), (0, 0, 255), (0, 128, 128), (255, 255, 0)]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def sample_images(count: int = 12) -> list[bytes]:
    """Solid colours with a little noise (palette-friendly), four colours in turn."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        base = np.broadcast_to(np.array(SOLID[i % len(SOLID)], dtype=np.float64), (40, 40, 3))
        out.append(png(np.clip(base + rng.normal(0, 3, base.shape), 0, 255)))
    return out


def refs(blobs: list[bytes]) -> list[common_pb2.ImageRef]:
    return [common_pb2.ImageRef(data=b) for b in blobs]


def expect_invalid(call: Callable[[], object], field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_embed_fit_tag_similar_and_palette_over_grpc(model_settings: Settings) -> None:
    settings = model_settings.replace(style_k=3, style_max_batch=16)

    with (
        serve(settings, create_service(settings), ready_timeout=60) as served,
        grpc.insecure_channel(served.address) as ch,
    ):
        stub = style_tagger_pb2_grpc.StyleTaggerStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        images = sample_images()

        # Tag needs a fitted set first.
        with pytest.raises(grpc.RpcError) as err:
            stub.Tag(style_tagger_pb2.TagRequest(images=refs(images[:1])))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        emb = stub.Embed(style_tagger_pb2.StyleTaggerEmbedRequest(images=refs(images)))
        assert emb.dim == 64 and len(emb.results) == len(images)
        assert emb.provenance.model_version and emb.provenance.model.endswith("clip")
        vectors = np.array([r.embedding for r in emb.results], dtype=np.float32)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

        # What the workflow does with Embed's answer: store the vectors as kind "style".
        ids = [r.image_id for r in emb.results]
        catalog = catalog_for(settings.database_url)
        add_images(catalog, EmbeddingTable(ids, vectors, [f"artist_{i % 4}" for i in range(12)], ["anime"] * 12))
        StyleStore(catalog).save_embeddings(
            zip(ids, vectors, strict=True), emb.provenance.model, emb.provenance.model_version
        )

        fit = stub.FitClusters(style_tagger_pb2.FitClustersRequest(activate=True, seed=1))
        assert fit.activated and fit.embeddings == 12 and fit.clusters == len(fit.reports) >= 3
        assert sum(r.size for r in fit.reports) == 12

        tagged = stub.Tag(
            style_tagger_pb2.TagRequest(
                images=[common_pb2.ImageRef(data=b"garbage"), *refs(images)], include_embedding=True
            )
        )
        bad, *good = tagged.results
        assert bad.error.field == "images[0]" and bad.error.reason == "invalid_image"
        assert tagged.provenance.component_version == fit.cluster_set_version
        report = {r.cluster_id: r for r in fit.reports}
        for result, vec in zip(good, vectors, strict=True):
            assert result.cluster_set_version == fit.cluster_set_version
            assert result.tag == report[result.cluster_id].tag
            assert np.allclose(result.embedding, vec, atol=1e-5)
            assert result.palette_tags and result.palette_tags[0].startswith("palette_")
        assert [r.palette_tags[0] for r in good[:4]] == [
            "palette_red",
            "palette_blue",
            "palette_teal",
            "palette_yellow",
        ]

        similar = stub.SimilarStyles(style_tagger_pb2.SimilarStylesRequest(image=refs(images[:1])[0], k=2))
        assert similar.cluster_set_version == fit.cluster_set_version
        tagged_ok = [r for r in fit.reports if r.tag]
        assert len(similar.clusters) == min(2, len(tagged_ok))
        if not good[0].flagged:
            assert similar.clusters[0].cluster_id == good[0].cluster_id
            assert similar.clusters[0].example_image_ids

        pal = stub.Palette(style_tagger_pb2.PaletteRequest(images=refs(images[:2]), colors=1))
        assert [[c.tag for c in r.colors] for r in pal.results] == [["palette_red"], ["palette_blue"]]

        # Bad inputs: INVALID_ARGUMENT naming the field; the service stays ready.
        expect_invalid(lambda: stub.Embed(style_tagger_pb2.StyleTaggerEmbedRequest()), "images")
        expect_invalid(lambda: stub.Tag(style_tagger_pb2.TagRequest(images=refs(images) * 2)), "images")
        expect_invalid(lambda: stub.FitClusters(style_tagger_pb2.FitClustersRequest(k=-1)), "k")
        expect_invalid(
            lambda: stub.FitClusters(style_tagger_pb2.FitClustersRequest(max_artist_share=2)), "max_artist_share"
        )
        expect_invalid(lambda: stub.SimilarStyles(style_tagger_pb2.SimilarStylesRequest(k=2)), "query")
        expect_invalid(lambda: stub.SimilarStyles(style_tagger_pb2.SimilarStylesRequest(cluster_id=999)), "cluster_id")
        expect_invalid(
            lambda: stub.SimilarStyles(
                style_tagger_pb2.SimilarStylesRequest(image=common_pb2.ImageRef(data=b"\x89PNG"))
            ),
            "image",
        )
        expect_invalid(
            lambda: stub.Palette(style_tagger_pb2.PaletteRequest(images=refs(images[:1]), colors=99)), "colors"
        )
        ready = health.Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert ready.status == health_pb2.HealthCheckResponse.SERVING
        again = stub.Tag(style_tagger_pb2.TagRequest(images=refs(images[:1])))
        assert again.results[0].tag == good[0].tag


def test_a_vit_encoder_from_config_gives_style_embeddings(tmp_path, settings: Settings) -> None:
    path = tmp_path / "vit"
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    tagger = StyleTaggerService(settings.replace(style_tagger_model=str(path)))
    tagger.model.load()
    assert isinstance(tagger.model.encoder, VitImageEncoder)
    images = [Image.open(io.BytesIO(b)) for b in sample_images(3)]
    vectors = tagger.embed(images)
    assert vectors.shape == (3, 48)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert tagger.model_version != "unknown"
