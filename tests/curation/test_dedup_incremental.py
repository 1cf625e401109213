"""Near-duplicates and selection at scale (issue 14): the block-permutation index finds exactly the pairs a brute force
finds, the groups equal the old quadratic grouping on planted sets, incremental dedup ends where a full regroup does
(SQLite and PostgreSQL), semantic dedup groups planted close embeddings, `ponyctl dedup` refuses bad flags with exit 2,
and the selection ranked in SQL is the one the Python ranking chooses."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sqlalchemy import select, update

from pony_common.catalog.db import Catalog, catalog_for, upsert
from pony_common.catalog.models import EmbeddingRow, ImageRow
from pony_common.cli.main import main
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.curation.categories import DEFAULT_MIX
from services.curation.duplicates import dedup_catalog, dedup_new, group_hashes, regroup
from services.curation.hamming_index import pairs_between, pairs_within, popcount
from services.curation.report import report_ids
from services.curation.selection import choose, eligible_pool, load_selection, select_images
from services.curation.semantic import close_pairs, normalised
from tests.conftest import fresh_postgres_database
from tests.curation.dedup_reference import reference_group_hashes
from tests.curation.pool import add_processed


def planted_hashes(rng: random.Random, n: int, max_flips: int, prefix: str = "") -> dict[str, str]:
    """n random hashes; every 4th gets one or two near copies (up to max_flips bits off), every 37th an exact copy,
    and every 50th a chain link one step from the previous near copy (so groups join through a middle image)."""
    hashes: dict[str, str] = {}
    for i in range(n):
        base = rng.getrandbits(64)
        hashes[f"{prefix}{i:05d}a"] = f"{base:016x}"
        if i % 4 == 0:
            for copy in "bc"[: rng.randint(1, 2)]:
                flipped = base
                for bit in rng.sample(range(64), rng.randint(0, max_flips)):
                    flipped ^= 1 << bit
                hashes[f"{prefix}{i:05d}{copy}"] = f"{flipped:016x}"
                if i % 50 == 0:
                    flipped ^= 1 << rng.randrange(64)
                    hashes[f"{prefix}{i:05d}{copy}x"] = f"{flipped:016x}"
        if i % 37 == 36:
            hashes[f"{prefix}{i:05d}z"] = hashes[f"{prefix}{i - 1:05d}a"]
    return hashes


def brute_pairs(a: np.ndarray, b: np.ndarray, d: int) -> set[tuple[int, int]]:
    i, j = np.nonzero(popcount(a[:, None] ^ b[None, :]) <= d)
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("distance", [0, 1, 3, 6, 9, 14])
def test_index_finds_exactly_the_pairs_a_brute_force_finds(distance: int) -> None:
    rng = np.random.default_rng(distance)
    base = rng.integers(0, 2**64, 1500, dtype=np.uint64)
    noise = np.zeros(len(base), dtype=np.uint64)
    for _ in range(distance + 1):
        bits = rng.integers(0, 64, len(base)).astype(np.uint64)
        noise ^= np.where(rng.random(len(base)) < 0.5, np.uint64(1) << bits, np.uint64(0))
    hashes = np.unique(np.concatenate([base, base[:500] ^ noise[:500]]))
    a, b = pairs_within(hashes, distance)
    within = {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)}
    expected = {(x, y) for x, y in brute_pairs(hashes, hashes, distance) if x < y}
    assert within == expected
    queries, indexed = hashes[:300], hashes[300:]
    q, i = pairs_between(queries, indexed, distance)
    assert set(zip(q.tolist(), i.tolist(), strict=True)) == brute_pairs(queries, indexed, distance)


@pytest.mark.parametrize("distance", [0, 2, 4, 6, 8, 12])
def test_groups_equal_the_quadratic_reference_on_planted_sets(distance: int) -> None:
    hashes = planted_hashes(random.Random(100 + distance), 1200, distance)
    groups = group_hashes(hashes, distance)
    assert groups == reference_group_hashes(hashes, distance)
    assert len(groups) > 300  # the planted copies were found, not an empty answer matching an empty answer


def _snapshot(catalog: Catalog) -> dict[str, tuple[str | None, bool, bool]]:
    with catalog.session() as s:
        return {r.id: (r.dup_group, r.is_duplicate, r.phash_indexed) for r in s.scalars(select(ImageRow))}


def check_incremental_equals_full(catalog: Catalog) -> None:
    rng = random.Random(5)
    hashes = planted_hashes(rng, 240, 6)
    names = sorted(hashes)
    rng.shuffle(names)
    # A bridge arriving last joins two groups that were separate until then.
    left, right = rng.getrandbits(64) & ~0xFFF, None
    right = left ^ 0xFFF  # 12 bits apart: two groups at distance 6
    bridge = left ^ 0x03F  # 6 from left, 6 from right
    batches = [names[:100], names[100:220], names[220:]]
    extra = {"bridge-left": f"{left:016x}", "bridge-left2": f"{left ^ 1:016x}", "bridge-right": f"{right:016x}"}
    hashes.update(extra)
    batches[0] += ["bridge-left", "bridge-left2"]
    batches[1] += ["bridge-right"]
    hashes["bridge-middle"] = f"{bridge:016x}"
    batches[2] += ["bridge-middle"]
    ids: dict[str, str] = {}
    for batch in batches:
        for name in batch:
            ids[name] = add_processed(catalog, name, "anime", rng.random(), phash=hashes[name])
        summary = dedup_new(catalog)
        assert summary.new_hashes == len(batch)
        assert dedup_new(catalog).new_hashes == 0  # nothing new: a second run is a no-op
    incremental = _snapshot(catalog)
    assert all(indexed for _, _, indexed in incremental.values())
    expected = reference_group_hashes({ids[n]: h for n, h in hashes.items()})
    assert {k: v[0] for k, v in incremental.items() if v[0] is not None} == expected
    assert incremental[ids["bridge-left"]][0] == incremental[ids["bridge-right"]][0] is not None
    regroup(catalog)
    assert _snapshot(catalog) == incremental
    # Exactly one member per group stays eligible.
    groups: dict[str, list[bool]] = {}
    for group, duplicate, _ in incremental.values():
        if group is not None:
            groups.setdefault(group, []).append(duplicate)
    assert groups and all(flags.count(False) == 1 for flags in groups.values())


def test_incremental_dedup_equals_full_regroup_on_sqlite(settings: Settings) -> None:
    check_incremental_equals_full(catalog_for(settings.database_url))


def test_incremental_dedup_equals_full_regroup_on_postgresql() -> None:
    with fresh_postgres_database() as url:
        catalog = Catalog(url)
        try:
            check_incremental_equals_full(catalog)
        finally:
            catalog.dispose()


def test_regroup_after_a_changed_hash_splits_what_incremental_only_merges(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    a = add_processed(catalog, "a", "anime", 0.4, phash="00000000000000ff")
    b = add_processed(catalog, "b", "anime", 0.6, phash="00000000000000fe")
    dedup_new(catalog)
    with catalog.session() as s:
        s.execute(update(ImageRow).where(ImageRow.id == b).values(phash="f0f0f0f0f0f0f0f0"))
    assert dedup_new(catalog).new_hashes == 0
    assert regroup(catalog) == 0
    with catalog.session() as s:
        assert [s.get(ImageRow, i).dup_group for i in (a, b)] == [None, None]
        assert [s.get(ImageRow, i).is_duplicate for i in (a, b)] == [False, False]


def _store_embedding(catalog: Catalog, image_id: str, vector: np.ndarray) -> None:
    with catalog.session() as s:
        upsert(
            s,
            EmbeddingRow,
            {
                "image_id": image_id,
                "kind": "clip",
                "dim": len(vector),
                "vector": vector.astype("<f4").tobytes(),
                "model": "m",
                "model_version": "1",
            },
            keys=("image_id", "kind"),
        )


def test_semantic_dedup_groups_planted_close_embeddings(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(60, 32)).astype(np.float32)
    planted = {7: 30, 12: 41, 20: 55}  # near copies: a little noise on another image's embedding
    for src, dst in planted.items():
        vectors[dst] = vectors[src] + rng.normal(scale=0.02, size=32).astype(np.float32)
    ids = []
    for i, vec in enumerate(vectors):
        # Far-apart pHashes: only the embeddings can group them.
        ids.append(add_processed(catalog, f"sem{i}", "anime", 0.5 + i / 200, phash=f"{rng.integers(0, 2**63):016x}"))
        _store_embedding(catalog, ids[-1], vec)
    summary = dedup_catalog(settings, semantic=True, threshold=0.05)
    assert summary.semantic_pairs == len(planted)
    with catalog.session() as s:
        rows = {r.id: r for r in s.scalars(select(ImageRow))}
    for src, dst in planted.items():
        pair = [rows[ids[src]], rows[ids[dst]]]
        assert pair[0].dup_group == pair[1].dup_group == min(ids[src], ids[dst])
        assert sorted(r.is_duplicate for r in pair) == [False, True]
    assert sum(r.dup_group is not None for r in rows.values()) == 2 * len(planted)
    # The clustered search (for large pools) finds the same planted pairs.
    unit = normalised(vectors)
    assert set(close_pairs(unit, 0.05, exact_limit=0)) == set(close_pairs(unit, 0.05)) == set(planted.items())
    with pytest.raises(InvalidArgument) as err:
        close_pairs(unit, 1.5)
    assert err.value.field == "threshold"


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings = settings.replace(log_level="WARNING")
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    return settings


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["dedup", "--semantic", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
        (["dedup", "--threshold", "0.1"], "--threshold needs --semantic"),
        (["dedup", "--dup-distance", "40"], "--dup-distance: must be in 0..32, got 40"),
    ],
)
def test_dedup_cli_refuses_bad_flags_with_exit_2(cli: Settings, capsys, argv: list[str], reason: str) -> None:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].endswith(reason), err


def test_dedup_cli_groups_new_hashes_and_reports_them(cli: Settings, capsys) -> None:
    catalog = catalog_for(cli.database_url)
    add_processed(catalog, "x", "anime", 0.5, phash="00000000000000ff")
    add_processed(catalog, "y", "anime", 0.7, phash="00000000000000fe")
    assert main(["dedup", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"new_hashes": 2' in out and '"grouped_images": 2' in out and '"duplicates": 1' in out


def check_selection_ranked_in_sql_equals_python_ranking(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    rng = random.Random(11)
    categories = ["pony", "furry", "western", "anime", "realism", "other"]
    for i in range(300):
        score = round(rng.random(), 1)  # many ties: the id decides
        decision = "block" if i % 13 == 0 else "allow"
        status = "failed" if i % 29 == 0 else "done"
        add_processed(catalog, f"sel{i}", rng.choice(categories), score, decision=decision, status=status)
    for total, min_score in ((40, None), (120, 0.3), (1000, None)):
        report = select_images(settings, total, DEFAULT_MIX, min_score=min_score, name=f"t{total}")
        chosen, quotas, _ = choose(eligible_pool(catalog, min_score), total, DEFAULT_MIX)
        assert report.image_ids == [c.image_id for c in chosen]
        assert load_selection(catalog, f"t{total}") == report.image_ids
        assert {r.category: r.selected for r in report.categories} == {c: quotas.get(c, 0) for c in DEFAULT_MIX}


def test_selection_ranked_in_sql_equals_python_ranking_on_sqlite(settings: Settings) -> None:
    check_selection_ranked_in_sql_equals_python_ranking(settings)


def test_selection_ranked_in_sql_equals_python_ranking_on_postgresql(settings: Settings) -> None:
    with fresh_postgres_database() as url:
        try:
            check_selection_ranked_in_sql_equals_python_ranking(settings.replace(database_url=url))
        finally:
            catalog_for(url).dispose()


def test_report_reads_only_the_images_it_shows_selection_first(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    ids = sorted(add_processed(catalog, f"rep{i}", "anime", i / 20) for i in range(12))
    selected = [ids[9], ids[3], ids[7]]
    assert report_ids(catalog, selected, 5) == [ids[3], ids[7], ids[9], ids[0], ids[1]]
    assert report_ids(catalog, selected, 2) == [ids[3], ids[7]]
    assert report_ids(catalog, [], 20) == ids
