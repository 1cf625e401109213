"""The style tables on SQLite and PostgreSQL: embeddings, versioned cluster sets and activation, assignments."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from pony_common.catalog.db import Catalog
from pony_common.catalog.models import StyleAssignmentRow, StyleClusterSetRow
from services.style_tagger.clusters import fit_cluster_set
from services.style_tagger.store import StyleAssignment, StyleStore
from tests.style_tagger.synthetic import Blob, add_images, make_table


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'catalog.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    cat = Catalog(url)
    yield cat
    cat.dispose()


def test_embeddings_cluster_sets_and_assignments_round_trip(catalog: Catalog) -> None:
    table, _ = make_table([Blob(6, ["a", "b", "c"], "anime"), Blob(6, ["d", "e", "f"], "furry")], seed=3)
    add_images(catalog, table)
    store = StyleStore(catalog)
    assert store.save_embeddings(zip(table.image_ids, table.vectors, strict=True), "m", "v1") == 12
    store.save_embeddings(zip(table.image_ids[:2], table.vectors[:2] * 2, strict=True), "m", "v1")  # upsert
    loaded = store.load_embeddings(model_version="v1")
    assert loaded.image_ids == sorted(table.image_ids)
    order = [table.image_ids.index(i) for i in loaded.image_ids]
    expected = table.vectors[order].copy()
    expected[[loaded.image_ids.index(i) for i in table.image_ids[:2]]] *= 2
    assert np.array_equal(loaded.vectors, expected)
    assert loaded.families == [table.families[i] for i in order]
    assert loaded.artists == [table.artists[i] for i in order]
    assert len(store.load_embeddings(model_version="v2")) == 0

    first = fit_cluster_set(loaded, k=2, per_family=False, max_artist_share=0.5, model="m", model_version="v1")
    second = fit_cluster_set(loaded, k=2, per_family=True, max_artist_share=0.5, model="m", model_version="v1")
    assert store.active_version() is None
    store.save_cluster_set(first, activate=True)
    store.save_cluster_set(second, activate=False)
    store.save_cluster_set(first, activate=False)  # re-saving keeps it active
    assert store.active_version() == first.version
    store.save_cluster_set(second, activate=True)
    assert store.active_version() == second.version
    with catalog.session() as s:
        assert s.scalars(select(StyleClusterSetRow.version).where(StyleClusterSetRow.active)).all() == [second.version]

    back = store.load_cluster_set(second.version)
    assert back is not None and np.array_equal(back.centroids, second.centroids)
    assert [c.to_dict() for c in back.clusters] == [c.to_dict() for c in second.clusters]
    assert (back.per_family, back.model_version, back.embeddings) == (True, "v1", 12)
    assert store.load_cluster_set("cs_missing") is None

    a = StyleAssignment(table.image_ids[0], second.version, 1, "style_cluster_1", 0.25, ("palette_red",))
    store.save_assignments([a])
    store.save_assignments([StyleAssignment(a.image_id, a.cluster_set_version, 0, "style_cluster_0", 0.5)])
    with catalog.session() as s:
        rows = s.scalars(select(StyleAssignmentRow)).all()
        assert [(r.cluster_id, r.tag, r.distance, r.palette_tags) for r in rows] == [(0, "style_cluster_0", 0.5, [])]
