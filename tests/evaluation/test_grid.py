"""The grid is deterministic: the same arguments give the same cells with the same seeds, in the same order."""

from __future__ import annotations

import pytest

from pony_common.errors import InvalidArgument
from services.trainer.evaluation.grid import DEFAULT_CONTENTS, GridSpec, build_grid, pick_clusters


def test_the_same_spec_gives_the_same_cells_and_seeds() -> None:
    spec = GridSpec(clusters=((2, "style_cluster_2"), (7, "style_cluster_7")), seeds=3)
    first, second = build_grid(spec), build_grid(GridSpec(**spec.__dict__))
    assert first == second
    assert len(first) == spec.size == len(DEFAULT_CONTENTS) * (2 + 4 + 4) * 2 * 3
    assert len({c.cell_id for c in first}) == len(first)
    assert {c.seed for c in first} == {1000, 1001, 1002}
    kinds = {c.style.kind for c in first}
    assert kinds == {"cluster", "source", "word"}
    contents = {c.content_id for c in first}
    assert {"portrait", "full_body", "close_up", "landscape", "object", "character_pony"} <= contents
    word = next(c for c in first if c.style.kind == "word")
    assert word.prompt.endswith(", " + word.style.value)
    cluster = next(c for c in first if c.style.kind == "cluster")
    assert cluster.prompt == cluster.content_text and cluster.style.cluster == 2
    # Score tags on/off pairs share everything else.
    on = {(c.content_id, c.style.style_id, c.seed) for c in first if c.score_tags}
    off = {(c.content_id, c.style.style_id, c.seed) for c in first if not c.score_tags}
    assert on == off


def test_another_base_seed_moves_only_the_seeds() -> None:
    a = build_grid(GridSpec(seeds=1, base_seed=5))
    b = build_grid(GridSpec(seeds=1, base_seed=6))
    assert [c.seed for c in a] == [5] * len(a) and [c.seed for c in b] == [6] * len(b)
    assert [c.prompt for c in a] == [c.prompt for c in b]


def test_cluster_pick_is_spread_and_deterministic() -> None:
    available = [(i, f"style_cluster_{i}") for i in range(10)]
    assert pick_clusters(available, 4) == pick_clusters(list(reversed(available)), 4)
    assert [c for c, _ in pick_clusters(available, 4)] == [0, 2, 5, 7]
    assert pick_clusters(available, 0) == () and len(pick_clusters(available, 99)) == 10


@pytest.mark.parametrize(
    ("spec", "field"),
    [(GridSpec(seeds=0), "seeds"), (GridSpec(contents=()), "contents"), (GridSpec(sources=(), words=()), "styles")],
)
def test_a_bad_grid_is_refused_naming_the_field(spec: GridSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        build_grid(spec)
    assert err.value.field == field
