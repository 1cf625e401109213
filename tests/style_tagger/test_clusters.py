"""Style clustering on synthetic embeddings of known structure: recovery, the artist guard, similar styles."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from pony_common.errors import FailedPrecondition, InvalidArgument
from services.style_tagger.clusters import (
    STATUS_FLAGGED,
    STATUS_OK,
    STATUS_SPLIT,
    artist_stats,
    fit_cluster_set,
    validate_tag_format,
)
from services.style_tagger.index import FaissStyleIndex, check_index_kind
from services.style_tagger.service import FitParams, StyleTaggerService
from tests.style_tagger.synthetic import DIM, Blob, add_images, make_table

MIXED = [f"artist_{i}" for i in range(8)]


def guard_table():
    """Four mixed blobs, one single-artist blob, and one blob whose larger half is a single artist's."""
    rng = np.random.default_rng(7)
    centre = rng.normal(size=DIM)
    centre /= np.linalg.norm(centre)
    step = rng.normal(size=DIM)
    step *= 0.5 / np.linalg.norm(step)
    blobs = [Blob(25, MIXED) for _ in range(4)]
    blobs.append(Blob(20, ["solo_artist"]))
    blobs.append(Blob(15, ["mono_artist"], offset=centre))
    blobs.append(Blob(10, MIXED, offset=centre + step))
    return make_table(blobs, seed=1)


def members_by_cluster(cluster_set, table) -> dict[int, set[int]]:
    """Cluster id -> set of true blob indexes of its members (via nearest centroid)."""
    index = FaissStyleIndex(cluster_set.centroids)
    _, rows = index.search(table.vectors, 1)
    return rows[:, 0]


def test_kmeans_recovers_blobs_and_the_artist_guard_flags_single_artist_clusters() -> None:
    table, truth = guard_table()
    cs = fit_cluster_set(table, k=6, per_family=False, max_artist_share=0.5, seed=3)

    assigned = members_by_cluster(cs, table)
    blobs_of: dict[int, set[int]] = defaultdict(set)
    for cluster, blob in zip(assigned, truth, strict=True):
        blobs_of[int(cluster)].add(int(blob))
    # Every cluster is pure; blobs 0..4 are one cluster each; the last blob pair (one k-means cluster) was split.
    assert all(len(b) == 1 for b in blobs_of.values())
    assert len(cs.clusters) == 7
    assert sorted(next(iter(b)) for b in blobs_of.values()) == [0, 1, 2, 3, 4, 5, 6]
    assert sum(c.size for c in cs.clusters) == len(table)

    by_blob = {next(iter(blobs_of[c.id])): c for c in cs.clusters}
    for b in range(4):
        assert by_blob[b].status == STATUS_OK
        assert by_blob[b].tag == f"style_cluster_{by_blob[b].id}"
        assert by_blob[b].top_artist_share <= 0.5
    solo = by_blob[4]
    assert solo.status == STATUS_FLAGGED and solo.tag == ""
    assert solo.top_artist == "solo_artist" and solo.top_artist_share == 1.0
    assert "solo_artist" in solo.reason and "limit 0.50" in solo.reason

    mono, mixed = by_blob[5], by_blob[6]
    assert mono.status == STATUS_FLAGGED and mono.tag == "" and mono.top_artist == "mono_artist"
    assert "after splitting" in mono.reason and f"cluster {mixed.id}" in mono.reason
    assert mixed.status == STATUS_SPLIT and mixed.tag == f"style_cluster_{mixed.id}"
    assert "0.60 of 25 images" in mixed.reason  # the parent's share, so the report says why it was split
    # No tag in the set stands for one artist.
    assert all(c.top_artist_share <= 0.5 for c in cs.clusters if c.tag)


def test_fit_is_deterministic_and_versioned_by_content() -> None:
    table, _ = guard_table()
    a = fit_cluster_set(table, k=6, per_family=False, max_artist_share=0.5, seed=3)
    b = fit_cluster_set(table, k=6, per_family=False, max_artist_share=0.5, seed=3)
    c = fit_cluster_set(table, k=6, per_family=False, max_artist_share=0.9, seed=3)
    assert a.version == b.version and a.version.startswith("cs_")
    assert c.version != a.version
    # A looser limit lets the mixed-with-mono blob pass whole (0.6 <= 0.9).
    assert [x.status for x in c.clusters].count(STATUS_SPLIT) == 0


def test_per_family_clusters_carry_family_prefixed_tags() -> None:
    blobs = [Blob(12, MIXED, "anime") for _ in range(3)] + [Blob(12, MIXED, "western cartoon") for _ in range(3)]
    table, truth = make_table(blobs, seed=2)
    cs = fit_cluster_set(table, k=3, per_family=True, max_artist_share=0.5, seed=0, tag_format="{family}_{n}")
    assert [c.family for c in cs.clusters] == ["anime"] * 3 + ["western cartoon"] * 3
    assert [c.id for c in cs.clusters] == list(range(6))
    assert [c.tag for c in cs.clusters] == [f"anime_{n}" for n in range(3)] + [
        f"western_cartoon_{n}" for n in (3, 4, 5)
    ]
    # k is per family: each family's three blobs come back as its three clusters.
    blobs_of: dict[int, set[int]] = defaultdict(set)
    for cluster, blob in zip(members_by_cluster(cs, table), truth, strict=True):
        blobs_of[int(cluster)].add(int(blob))
    assert sorted(tuple(b) for b in blobs_of.values()) == [(b,) for b in range(6)]


def test_artist_stats_normalises_spelling_and_ignores_unknown_artists() -> None:
    assert artist_stats(["Some_Artist", "some artist", None, "other"]) == ("Some_Artist", 0.5)
    assert artist_stats([None, None]) == ("", 0.0)


@pytest.mark.parametrize("fmt", ["style_{x}", "style", "Style_{n}", "{n}-{family}"])
def test_bad_tag_formats_are_refused(fmt: str) -> None:
    with pytest.raises(ValueError):
        validate_tag_format(fmt)


def test_pgvector_index_is_refused_honestly() -> None:
    from pony_common.config import ConfigError

    with pytest.raises(ConfigError, match="no pgvector backend"):
        check_index_kind("pgvector")


def line_table():
    """Five blobs on a line, one unit apart: the nearest clusters of blob 0 are blobs 1, 2, 3, 4 in order."""
    rng = np.random.default_rng(11)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    base = rng.normal(size=DIM)
    return make_table([Blob(10, MIXED, offset=base + i * direction) for i in range(5)], noise=0.01, seed=5)


@pytest.fixture
def tagger(model_settings: Settings):
    backend = StyleTaggerService(model_settings.replace(style_k=5))
    backend.model.load()
    yield backend
    catalog_for(model_settings.database_url).dispose()


def test_similar_styles_returns_the_true_nearest_clusters(tagger: StyleTaggerService) -> None:
    table, truth = line_table()
    add_images(tagger.store.catalog, table)
    tagger.store.save_embeddings(
        zip(table.image_ids, table.vectors, strict=True), tagger.model_id, tagger.model_version
    )
    cs = tagger.fit_clusters(FitParams(seed=1))
    assert len(cs.clusters) == 5
    cluster_of_blob = {int(truth[i]): int(c) for i, c in enumerate(members_by_cluster(cs, table))}

    version, found = tagger.similar_styles(cluster_id=cluster_of_blob[0], k=3, examples=2)
    assert version == cs.version
    assert [s.cluster.id for s in found] == [cluster_of_blob[1], cluster_of_blob[2], cluster_of_blob[3]]
    assert [s.distance for s in found] == sorted(s.distance for s in found)
    assert found[0].distance == pytest.approx(1.0, abs=0.05)
    for s in found:
        assert len(s.examples) == 2
        assert all(truth[table.image_ids.index(e)] == truth[table.image_ids.index(s.examples[0])] for e in s.examples)

    # From a vector: brute force over the centroids agrees.
    query = table.vectors[table.image_ids.index(cs.clusters[cluster_of_blob[4]].examples[0])]
    _, found = tagger.similar_styles(vector=query, k=5)
    brute = np.argsort(((cs.centroids - query) ** 2).sum(axis=1))
    assert [s.cluster.id for s in found] == brute.tolist()
    assert found[0].cluster.id == cluster_of_blob[4]

    # Tagging the same embeddings gives each blob its own cluster.
    results = tagger.tag_vectors(table.vectors, table.image_ids)
    assert {(int(truth[i]), r.cluster_id) for i, r in enumerate(results)} == set(cluster_of_blob.items())
    assert all(r.tag == f"style_cluster_{r.cluster_id}" and r.cluster_set_version == cs.version for r in results)


def test_similar_styles_skip_flagged_clusters(tagger: StyleTaggerService) -> None:
    table, _ = guard_table()
    add_images(tagger.store.catalog, table)
    tagger.store.save_embeddings(
        zip(table.image_ids, table.vectors, strict=True), tagger.model_id, tagger.model_version
    )
    cs = tagger.fit_clusters(FitParams(k=6, seed=3))
    flagged = {c.id for c in cs.clusters if c.status == STATUS_FLAGGED}
    assert len(flagged) == 2
    _, found = tagger.similar_styles(cluster_id=0, k=10)
    assert {s.cluster.id for s in found}.isdisjoint(flagged | {0})
    assert len(found) == len(cs.clusters) - len(flagged) - (0 not in flagged)
    # Tag still reports the nearest cluster of a single artist's image, but with no tag.
    solo = table.artists.index("solo_artist")
    result = tagger.tag_vectors(table.vectors[[solo]], [table.image_ids[solo]])[0]
    assert result.flagged and result.tag == "" and result.cluster_id in flagged


def test_bad_fit_and_query_arguments_name_the_field(tagger: StyleTaggerService) -> None:
    with pytest.raises(FailedPrecondition, match="at least 2 style embeddings"):
        tagger.fit_clusters(FitParams())
    with pytest.raises(FailedPrecondition, match="no active style cluster set"):
        tagger.similar_styles(cluster_id=0)
    for params, field in [(FitParams(k=-1), "k"), (FitParams(max_artist_share=1.5), "max_artist_share")]:
        with pytest.raises(InvalidArgument) as err:
            tagger.fit_clusters(params)
        assert err.value.field == field
    table, _ = line_table()
    add_images(tagger.store.catalog, table)
    tagger.store.save_embeddings(
        zip(table.image_ids, table.vectors, strict=True), tagger.model_id, tagger.model_version
    )
    tagger.fit_clusters(FitParams())
    for kwargs, field in [
        ({"cluster_id": 99}, "cluster_id"),
        ({"cluster_id": 0, "k": -2}, "k"),
        ({"cluster_id": 0, "examples": 100}, "examples"),
        ({}, "query"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            tagger.similar_styles(**kwargs)
        assert err.value.field == field


def test_embeddings_of_another_encoder_version_are_not_clustered(tagger: StyleTaggerService) -> None:
    table, _ = line_table()
    add_images(tagger.store.catalog, table)
    tagger.store.save_embeddings(zip(table.image_ids, table.vectors, strict=True), "other-model", "v-other")
    with pytest.raises(FailedPrecondition, match="found 0"):
        tagger.fit_clusters(FitParams())
