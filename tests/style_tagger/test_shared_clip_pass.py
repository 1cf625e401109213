"""One CLIP pass shared by score, style and safety, over real gRPC with the tiny CLIP: the style tagger tags from
passed embeddings exactly as from pixels (no tower forward, no image read with skip_palette), refuses embeddings of
another width by field, reads blob keys, merges concurrent calls into one encoder batch, and FitClusters(assign)
tags every stored embedding without the tower. Then score -> style -> safety costs one forward per image."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from pony.v1 import common_pb2, safety_pb2, safety_pb2_grpc, scorer_pb2, scorer_pb2_grpc, style_tagger_pb2
from pony.v1 import style_tagger_pb2_grpc as style_grpc
from pony_common.blobs import BlobStore, image_key
from pony_common.catalog.db import catalog_for, upsert
from pony_common.catalog.models import EmbeddingRow, StyleAssignmentRow
from pony_common.config import Settings
from pony_common.images import decode_image, image_id
from pony_common.models.clip import ClipImageTower
from pony_common.testing import ServerLoop, serve
from services.safety.app import create_service as create_safety
from services.scorer.app import create_service as create_scorer
from services.style_tagger.app import create_service as create_style
from services.style_tagger.clusters import EmbeddingTable
from services.style_tagger.store import StyleStore, vector_bytes
from tests.style_tagger.synthetic import add_images
from tests.style_tagger.test_service import expect_invalid, refs, sample_images

COUNT = 12


def forwards(settings: Settings) -> int:
    return ClipImageTower.shared(settings.model_path("style_tagger")).forward_images


def fit_on_stored(settings: Settings, stub: style_grpc.StyleTaggerStub, images: list[bytes], kind: str) -> list[str]:
    """Embeds the images, stores the vectors as catalog embeddings of `kind`, fits and activates a set. Returns
    the image ids."""
    emb = stub.Embed(style_tagger_pb2.StyleTaggerEmbedRequest(images=refs(images)), timeout=60)
    ids = [r.image_id for r in emb.results]
    vectors = np.array([r.embedding for r in emb.results], dtype=np.float32)
    catalog = catalog_for(settings.database_url)
    add_images(
        catalog, EmbeddingTable(ids, vectors, [f"artist_{i % 4}" for i in range(len(ids))], ["anime"] * len(ids))
    )
    store = StyleStore(catalog)
    if kind == "style":
        store.save_embeddings(zip(ids, vectors, strict=True), emb.provenance.model, emb.provenance.model_version)
    else:  # the scorer's kind: the same CLIP vectors, stored by the score stage
        rows = [
            {
                "image_id": i,
                "kind": kind,
                "dim": int(v.shape[0]),
                "vector": vector_bytes(v),
                "model": emb.provenance.model,
                "model_version": emb.provenance.model_version,
            }
            for i, v in zip(ids, vectors, strict=True)
        ]
        with catalog.session() as s:
            upsert(s, EmbeddingRow, rows, keys=["image_id", "kind"])
    stub.FitClusters(style_tagger_pb2.FitClustersRequest(k=3, activate=True, seed=1), timeout=60)
    return ids


def test_tag_from_passed_embeddings_equals_the_pixel_path_without_a_forward(model_settings: Settings) -> None:
    settings = model_settings.replace(style_max_batch=32)
    images = sample_images(COUNT)
    with serve(settings, create_style(settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = style_grpc.StyleTaggerStub(ch)
        fit_on_stored(settings, stub, images, "style")
        pixel = stub.Tag(style_tagger_pb2.TagRequest(images=refs(images), include_embedding=True), timeout=60)
        given = [common_pb2.Embedding(values=r.embedding) for r in pixel.results]

        before = forwards(settings)
        passed = stub.Tag(style_tagger_pb2.TagRequest(images=refs(images), embeddings=given), timeout=60)
        # skip_palette: the images are not read at all (these keys name no blob).
        unread = [common_pb2.ImageRef(uri=f"images/none/{i}.png", image_id=f"id-{i}") for i in range(COUNT)]
        skipped = stub.Tag(style_tagger_pb2.TagRequest(images=unread, embeddings=given, skip_palette=True), timeout=60)
        assert forwards(settings) == before

        for p, a, s in zip(pixel.results, passed.results, skipped.results, strict=True):
            assert not p.HasField("error") and not a.HasField("error") and not s.HasField("error")
            assert (a.cluster_id, a.tag, a.cluster_set_version) == (p.cluster_id, p.tag, p.cluster_set_version)
            assert (s.cluster_id, s.tag) == (p.cluster_id, p.tag)
            assert a.distance == pytest.approx(p.distance, abs=1e-5)
            assert s.distance == pytest.approx(p.distance, abs=1e-5)
            assert a.image_id == p.image_id and list(a.palette_tags) == list(p.palette_tags) and p.palette_tags
            assert not s.palette_tags
        assert [s.image_id for s in skipped.results] == [f"id-{i}" for i in range(COUNT)]
        hostile = [common_pb2.ImageRef(uri="images/none/0.png", image_id="id\x00"), *unread[1:]]
        checked = stub.Tag(style_tagger_pb2.TagRequest(images=hostile, embeddings=given, skip_palette=True))
        assert checked.results[0].error.field == "images[0].image_id"
        assert not checked.results[1].HasField("error")

        # By blob key, as the curation worker sends them: the same answer as inline bytes.
        store = BlobStore(settings.blob_url)
        keys = [store.put(image_key(image_id(b), "png"), b) for b in images[:3]]
        by_key = stub.Tag(style_tagger_pb2.TagRequest(images=[common_pb2.ImageRef(uri=k) for k in keys]), timeout=60)
        for k, p in zip(by_key.results, pixel.results[:3], strict=True):
            assert (k.image_id, k.cluster_id, list(k.palette_tags)) == (p.image_id, p.cluster_id, list(p.palette_tags))

        # Embeddings of another width, or not one per image: refused by field, before anything runs.
        wrong = [given[0], common_pb2.Embedding(values=[0.1] * 768), *given[2:]]
        expect_invalid(
            lambda: stub.Tag(style_tagger_pb2.TagRequest(images=refs(images), embeddings=wrong)), "embeddings[1]"
        )
        expect_invalid(
            lambda: stub.Tag(style_tagger_pb2.TagRequest(images=refs(images), embeddings=given[:3])), "embeddings"
        )
        nan = [common_pb2.Embedding(values=[float("nan")] * 64), *given[1:]]
        expect_invalid(
            lambda: stub.Tag(style_tagger_pb2.TagRequest(images=refs(images), embeddings=nan)), "embeddings[0]"
        )


def test_fit_clusters_with_assign_tags_every_stored_embedding_without_the_tower(model_settings: Settings) -> None:
    settings = model_settings.replace(style_max_batch=32)
    images = sample_images(COUNT)
    with serve(settings, create_style(settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = style_grpc.StyleTaggerStub(ch)
        # The scorer's kind `clip` is enough: the style tagger's encoder is the same tower.
        ids = fit_on_stored(settings, stub, images, "clip")
        pixel = stub.Tag(style_tagger_pb2.TagRequest(images=refs(images)), timeout=60)
        catalog = catalog_for(settings.database_url)
        with catalog.session() as s:  # an earlier set's row with palette tags: kept on the new assignment
            upsert(
                s,
                StyleAssignmentRow,
                {"image_id": ids[0], "cluster_set_version": "older", "cluster_id": 0, "tag": "t", "distance": 0.0,
                 "palette_tags": ["palette_red"]},
                keys=["image_id", "cluster_set_version"],
            )  # fmt: skip

        before = forwards(settings)
        fit = stub.FitClusters(style_tagger_pb2.FitClustersRequest(k=3, activate=True, seed=1, assign=True), timeout=60)
        assert forwards(settings) == before
        assert fit.assigned == COUNT and fit.embeddings == COUNT
        with catalog.session() as s:
            rows = {
                r.image_id: r
                for r in s.query(StyleAssignmentRow).filter_by(cluster_set_version=fit.cluster_set_version).all()
            }
        assert sorted(rows) == sorted(ids)
        for image, tag in zip(ids, pixel.results, strict=True):
            assert (rows[image].cluster_id, rows[image].tag) == (tag.cluster_id, tag.tag)
            assert rows[image].distance == pytest.approx(tag.distance, abs=1e-5)
        assert rows[ids[0]].palette_tags == ["palette_red"]
        again = stub.FitClusters(style_tagger_pb2.FitClustersRequest(k=3, activate=True, seed=1, assign=True))
        assert again.cluster_set_version == fit.cluster_set_version and again.assigned == COUNT


def test_concurrent_tag_calls_share_one_encoder_batch(model_settings: Settings) -> None:
    calls, per_call = 3, 2
    settings = model_settings.replace(
        style_max_batch=32, style_batch_size=calls * per_call, style_batch_delay_ms=600_000
    )
    images = sample_images(COUNT)
    name = {"model": "style_tagger"}
    with serve(settings, create_style(settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = style_grpc.StyleTaggerStub(ch)
        # Embed's 12 images fill two full batches of 6; then the set is fitted.
        fit_on_stored(settings, stub, images, "style")
        count = REGISTRY.get_sample_value("pony_model_batch_size_count", name) or 0.0
        merged = REGISTRY.get_sample_value("pony_model_requests_merged_total", name) or 0.0
        chunks = [images[c * per_call : (c + 1) * per_call] for c in range(calls)]
        futures = [
            stub.Tag.future(style_tagger_pb2.TagRequest(images=refs(chunk), include_embedding=True), timeout=120)
            for chunk in chunks
        ]
        replies = [f.result() for f in futures]
        assert REGISTRY.get_sample_value("pony_model_batch_size_count", name) - count == 1
        assert REGISTRY.get_sample_value("pony_model_requests_merged_total", name) - merged == calls
        tower = ClipImageTower.shared(settings.model_path("style_tagger"))
        for chunk, reply in zip(chunks, replies, strict=True):
            alone = stub.Tag(
                style_tagger_pb2.TagRequest(
                    images=refs(chunk),
                    embeddings=[
                        common_pb2.Embedding(values=tower.embed([img]).tolist()[0]) for img in map(decode_image, chunk)
                    ],
                ),
                timeout=60,
            )
            for got, want, blob in zip(reply.results, alone.results, chunk, strict=True):
                assert got.image_id == image_id(blob) == want.image_id
                assert (got.cluster_id, list(got.palette_tags)) == (want.cluster_id, list(want.palette_tags))
                assert got.distance == pytest.approx(want.distance, abs=1e-5)


def test_score_style_and_safety_cost_one_clip_forward_per_image(model_settings: Settings) -> None:
    settings = model_settings.replace(style_max_batch=32)
    images = sample_images(COUNT)
    with ServerLoop() as servers:
        scorer = servers.start(settings, create_scorer(settings))
        style = servers.start(settings, create_style(settings))
        safety = servers.start(settings, create_safety(settings))
        with (
            grpc.insecure_channel(f"127.0.0.1:{scorer.port}") as c1,
            grpc.insecure_channel(f"127.0.0.1:{style.port}") as c2,
            grpc.insecure_channel(f"127.0.0.1:{safety.port}") as c3,
        ):
            style_stub = style_grpc.StyleTaggerStub(c2)
            fit_on_stored(settings, style_stub, images, "style")
            store = BlobStore(settings.blob_url)
            keys = [store.put(image_key(image_id(b), "png"), b) for b in images]
            by_key = [common_pb2.ImageRef(uri=k, image_id=image_id(b)) for k, b in zip(keys, images, strict=True)]

            before = forwards(settings)
            scored = scorer_pb2_grpc.ScorerStub(c1).Score(
                scorer_pb2.ScoreRequest(images=by_key, include_embeddings=True), timeout=60
            )
            embeddings = [common_pb2.Embedding(values=r.embedding) for r in scored.results]
            tags = style_stub.Tag(
                style_tagger_pb2.TagRequest(images=by_key, embeddings=embeddings, skip_palette=True), timeout=60
            )
            checked = safety_pb2_grpc.SafetyStub(c3).Check(
                safety_pb2.CheckRequest(
                    items=[
                        safety_pb2.SafetyItem(item_id=str(i), image=ref, embedding=e)
                        for i, (ref, e) in enumerate(zip(by_key, embeddings, strict=True))
                    ]
                ),
                timeout=60,
            )
            assert forwards(settings) - before == COUNT
    assert all(not r.HasField("error") for r in [*scored.results, *tags.results, *checked.results])
    assert all(len(r.rating_scores) == 3 for r in checked.results)
