"""Selection: the mix is met when the pool allows it, shortfalls are redistributed and reported, and the
choice is deterministic, best-scored first, without blocked, failed or duplicate images."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.cli.main import main
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.curation.categories import CATEGORIES, DEFAULT_MIX
from services.curation.selection import load_selection, parse_mix, plan_quotas, select_images
from services.curation.store import SelectionRow
from tests.curation.pool import add_processed

MIX_TEXT = "pony=0.10,furry=0.10,western=0.20,anime=0.25,realism=0.25,other=0.10"


def test_parse_mix_takes_shares_that_sum_to_one_and_rejects_unknown_categories() -> None:
    mix = parse_mix("pony=0.25,anime=0.75")
    assert mix == {"pony": 0.25, "anime": 0.75}
    assert sum(parse_mix(MIX_TEXT).values()) == pytest.approx(1.0)
    # Never silently rescaled: shares that do not add up to 1 are an error naming the sum and a fix.
    with pytest.raises(InvalidArgument, match=r"sum to 4, not 1 .*e\.g\. pony=0\.25,anime=0\.75"):
        parse_mix("pony=1,anime=3")
    with pytest.raises(InvalidArgument, match=r"sum to 0\.999,"):
        parse_mix("pony=0.333,anime=0.333,furry=0.333")
    with pytest.raises(InvalidArgument, match="CATEGORY"):
        parse_mix("ponies=1,dragons=2")
    with pytest.raises(InvalidArgument, match="not a number"):
        parse_mix("pony=lots")
    with pytest.raises(InvalidArgument, match="sum to 0"):
        parse_mix("pony=0")


def test_quotas_meet_the_mix_when_the_pool_allows_it() -> None:
    quotas = plan_quotas(100, parse_mix(MIX_TEXT), {c: 1000 for c in CATEGORIES})
    assert quotas == {"pony": 10, "furry": 10, "western": 20, "anime": 25, "realism": 25, "other": 10}


def test_shortfalls_go_to_categories_with_spare_images_in_proportion() -> None:
    available = {"pony": 0, "furry": 1, "western": 100, "anime": 100, "realism": 2, "other": 100}
    quotas = plan_quotas(20, DEFAULT_MIX, available)
    # targets 2,2,4,5,5,2: pony lacks 2, furry 1, realism 3 -> 6 shared 0.20:0.25:0.10 by western/anime/other
    assert quotas == {"pony": 0, "furry": 1, "western": 6, "anime": 8, "realism": 2, "other": 3}
    assert sum(quotas.values()) == 20


def test_a_pool_smaller_than_the_total_gives_everything_it_has() -> None:
    available = {"pony": 3, "anime": 4}
    assert plan_quotas(50, DEFAULT_MIX, available) == {c: available.get(c, 0) for c in CATEGORIES}


def _pool(catalog, per_category: dict[str, int]) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for cat, n in per_category.items():
        for i in range(n):
            ids.setdefault(cat, []).append(add_processed(catalog, f"{cat}-{i}", cat, round(0.05 + 0.9 * i / n, 4)))
    return ids


def test_select_meets_the_mix_and_prefers_higher_scores(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    ids = _pool(catalog, {c: 30 for c in CATEGORIES})
    report = select_images(settings, 40, parse_mix(MIX_TEXT), name="v7")
    got = {r.category: r.selected for r in report.categories}
    assert got == {"pony": 4, "furry": 4, "western": 8, "anime": 10, "realism": 10, "other": 4}
    assert report.shortfalls == {}
    assert all(abs(r.achieved_share - r.target_share) < 1e-9 for r in report.categories)
    chosen = set(load_selection(catalog, "v7"))
    # Highest scores in each category: the pool's last-added images (score rises with i).
    assert set(ids["anime"][-10:]) <= chosen and not set(ids["anime"][:-10]) & chosen
    with catalog.session() as s:
        rows = s.scalars(select(SelectionRow).where(SelectionRow.name == "v7")).all()
    assert len(rows) == 40 and sorted(r.rank for r in rows) == list(range(40))


def test_select_reports_shortfalls_and_redistributes(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    _pool(catalog, {"pony": 1, "furry": 10, "western": 10, "anime": 10, "realism": 0, "other": 10})
    report = select_images(settings, 20, DEFAULT_MIX)
    assert report.shortfalls == {"pony": 1, "realism": 5}
    got = {r.category: r.selected for r in report.categories}
    assert got["pony"] == 1 and got["realism"] == 0
    assert report.selected == 20
    assert "realism short by 5" in report.table()


def test_blocked_failed_duplicate_and_low_scored_images_are_never_selected(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    good = add_processed(catalog, "good", "anime", 0.5)
    blocked = add_processed(catalog, "blocked", "anime", 0.99, decision="block")
    failed = add_processed(catalog, "failed", "anime", 0.98, status="failed")
    best = add_processed(catalog, "dup-best", "anime", 0.9, phash="ffffffffffffffff")
    worse = add_processed(catalog, "dup-worse", "anime", 0.95, phash="fffffffffffffffe")
    low = add_processed(catalog, "low", "anime", 0.1)
    with catalog.session() as s:
        s.execute(update(ImageRow).where(ImageRow.id.in_([best, worse])).values(dup_group=min(best, worse)))
    # The better-scored member of a duplicate group stays eligible: here "dup-worse" scored 0.95.
    report = select_images(settings, 10, {"anime": 1.0}, min_score=0.2)
    chosen = set(report.image_ids)
    assert chosen == {good, worse}
    assert blocked not in chosen and failed not in chosen and best not in chosen and low not in chosen


def test_selection_is_deterministic_and_replaces_the_previous_one(settings: Settings) -> None:
    catalog = catalog_for(settings.database_url)
    for i in range(12):
        add_processed(catalog, f"tie-{i}", "other", 0.5)  # all tied: the id order decides
    first = select_images(settings, 5, {"other": 1.0}).image_ids
    second = select_images(settings, 5, {"other": 1.0}).image_ids
    assert first == second == sorted(first)
    assert load_selection(catalog, "default") == first


def test_cli_select_prints_target_vs_achieved(settings: Settings, monkeypatch, capsys) -> None:

    catalog = catalog_for(settings.database_url)
    _pool(catalog, {"anime": 5, "pony": 5})
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert main(["select", "--total", "6", "--mix", "pony=0.5,anime=0.5", "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "selected 6 of 6" in out and "pony" in out
    assert main(["select", "--total", "0"]) == 2
    assert main(["select", "--total", "5", "--mix", "dragons=1"]) == 2


def test_selection_and_duplicates_on_postgresql(settings: Settings, postgres_url: str) -> None:
    """The same selection on the production catalog database."""
    pg = settings.replace(database_url=postgres_url)
    catalog = catalog_for(pg.database_url)
    try:
        _pool(catalog, {"pony": 1, "furry": 10, "western": 10, "anime": 10, "realism": 0, "other": 10})
        a = add_processed(catalog, "pg-dup-a", "anime", 0.99, phash="0f0f0f0f0f0f0f0f")
        b = add_processed(catalog, "pg-dup-b", "anime", 0.98, phash="0f0f0f0f0f0f0f0e")
        from services.curation.duplicates import regroup

        assert regroup(catalog) == 2
        report = select_images(pg, 20, DEFAULT_MIX)
        assert report.shortfalls == {"pony": 1, "realism": 5} and report.selected == 20
        assert a in report.image_ids and b not in report.image_ids
        assert load_selection(catalog, "default") == report.image_ids
    finally:
        catalog.dispose()
