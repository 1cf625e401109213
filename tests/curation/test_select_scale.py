"""`select`, duplicates and `status` on what the database keeps (migration 0006: images.score / safety_allowed /
dup_stale copied by triggers, the pool's partial index, stage_counts) give exactly what a straightforward computation
over the base tables gives, on SQLite and PostgreSQL, through score, safety, status and group changes."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text, update

from pony_common.catalog import Catalog, upgrade, upsert
from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import AestheticScoreRow, ImageRow, SafetyDecisionRow
from pony_common.config import Settings
from services.curation import status as status_module
from services.curation.categories import CATEGORIES, DEFAULT_MIX
from services.curation.duplicates import regroup
from services.curation.selection import load_selection, plan_quotas, select_images
from services.curation.status import curation_status, stage_counts
from services.curation.store import SelectionRow, StageRow, claim_batch, complete_batch, fail_batch, wait_batch
from tests.curation.pool import add_processed, fake_id


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield settings
        return
    pg = settings.replace(database_url=request.getfixturevalue("postgres_url"))
    yield pg
    catalog_for(pg.database_url).dispose()


def reference_selection(
    catalog: Catalog, total: int, mix: Mapping[str, float], min_score: float | None
) -> tuple[list[str], dict[str, int]]:
    """The selection computed the plain way from the base tables: each group's best member (failed never wins,
    unscored below scored, ties to the smaller id), then the pool (done, allowed, not a duplicate, scored), then
    per category the best scores (ties: smaller id), ranked by score then id."""
    with catalog.session() as s:
        rows = s.execute(
            select(
                ImageRow.id, ImageRow.category, ImageRow.status, ImageRow.dup_group, AestheticScoreRow.score
            ).outerjoin(AestheticScoreRow, AestheticScoreRow.image_id == ImageRow.id)
        ).all()
        allowed = set(s.scalars(select(SafetyDecisionRow.image_id).where(SafetyDecisionRow.decision == "allow")))
    groups: dict[str, list] = {}
    for r in rows:
        if r.dup_group is not None:
            groups.setdefault(r.dup_group, []).append(r)
    winners = {
        min(members, key=lambda r: (r.status == "failed", -(r.score if r.score is not None else -1.0), r.id)).id
        for members in groups.values()
    }
    pool = [
        r
        for r in rows
        if r.status == "done"
        and r.id in allowed
        and r.score is not None
        and (r.dup_group is None or r.id in winners)
        and (min_score is None or r.score >= min_score)
    ]
    by_cat: dict[str, list] = {}
    for r in sorted(pool, key=lambda r: (-r.score, r.id)):
        by_cat.setdefault(r.category, []).append(r)
    available = {c: len(v) for c, v in by_cat.items()}
    quotas = plan_quotas(total, mix, available)
    chosen = [r for c, n in quotas.items() for r in by_cat.get(c, [])[:n]]
    return [r.id for r in sorted(chosen, key=lambda r: (-r.score, r.id))], available


def random_catalog(catalog: Catalog, rng: random.Random, n: int) -> list[str]:
    """Images with tied scores (a coarse grid), some unscored, blocked, undecided or failed, in near-duplicate
    groups written directly (as a dedup run writes dup_group)."""
    ids = []
    for i in range(n):
        score = rng.choice([0.1, 0.3, 0.5, 0.5, 0.7, 0.9, 0.9])
        decision = "block" if rng.random() < 0.1 else "allow"
        status = "failed" if rng.random() < 0.08 else "done"
        image_id = add_processed(catalog, f"img-{i}", rng.choice(CATEGORIES), score, decision=decision, status=status)
        ids.append(image_id)
    with catalog.session() as s:
        unscored = rng.sample(ids, n // 10)
        s.execute(delete(AestheticScoreRow).where(AestheticScoreRow.image_id.in_(unscored)))
        s.execute(delete(SafetyDecisionRow).where(SafetyDecisionRow.image_id.in_(rng.sample(ids, n // 20))))
        members = rng.sample(ids, n // 2)
        for start in range(0, len(members), 3):
            group = members[start : start + rng.choice([2, 3])]
            s.execute(update(ImageRow).where(ImageRow.id.in_(group)).values(dup_group=min(group)))
    return ids


def check_select(settings: Settings, catalog: Catalog, total: int, min_score: float | None = None) -> None:
    mix = {"pony": 0.3, "furry": 0.1, "western": 0.2, "anime": 0.2, "realism": 0.15, "other": 0.05}
    report = select_images(settings, total, mix, min_score=min_score, name="scale")
    want, available = reference_selection(catalog, total, mix, min_score)
    assert report.image_ids == want
    assert load_selection(catalog, "scale") == want
    assert {r.category: r.available for r in report.categories} == {c: available.get(c, 0) for c in mix}
    with catalog.session() as s:
        query = select(SelectionRow.image_id, SelectionRow.rank).where(SelectionRow.name == "scale")
        ranks = {image_id: rank for image_id, rank in s.execute(query)}
    assert [ranks[i] for i in want] == list(range(len(want)))


def test_select_equals_the_reference_through_score_safety_status_and_group_changes(db_settings: Settings) -> None:
    catalog = catalog_for(db_settings.database_url)
    rng = random.Random(14)
    ids = random_catalog(catalog, rng, 160)
    for total in (1, 17, 60, 500):
        check_select(db_settings, catalog, total)
    check_select(db_settings, catalog, 40, min_score=0.5)
    # Later writes, as the workflow and re-runs make them: new scores (ties included), a decision changed, a status
    # changed, a score removed, two groups merged; each select resolves only what changed, and equals the reference.
    for image_id in rng.sample(ids, 25):
        add_processed(catalog, f"img-{ids.index(image_id)}", "anime", rng.choice([0.2, 0.5, 0.95]))
    with catalog.session() as s:
        s.execute(update(SafetyDecisionRow).where(SafetyDecisionRow.image_id.in_(ids[:10])).values(decision="block"))
        s.execute(update(ImageRow).where(ImageRow.id.in_(ids[10:20])).values(status="failed"))
        s.execute(update(ImageRow).where(ImageRow.id.in_(ids[20:30])).values(status="done"))
        s.execute(delete(AestheticScoreRow).where(AestheticScoreRow.image_id.in_(ids[30:35])))
        groups = sorted({g for g in s.scalars(select(ImageRow.dup_group).where(ImageRow.dup_group.is_not(None)))})
        merged = groups[:2]
        s.execute(update(ImageRow).where(ImageRow.dup_group.in_(merged)).values(dup_group=min(merged)))
    check_select(db_settings, catalog, 60)
    check_select(db_settings, catalog, 500)
    # A full regroup from pHashes replaces the groups: the next select agrees with it as well.
    with catalog.session() as s:
        s.execute(update(ImageRow).values(phash="00000000000000ff"))
        s.execute(update(ImageRow).where(ImageRow.id.in_(ids[::2])).values(phash="ffffffffffff0000"))
    assert regroup(catalog) == len(ids)
    check_select(db_settings, catalog, 60)


def test_the_copies_on_images_follow_their_tables(db_settings: Settings) -> None:
    catalog = catalog_for(db_settings.database_url)
    a = add_processed(catalog, "copy-a", "pony", 0.4)
    b = add_processed(catalog, "copy-b", "pony", 0.6, decision="block")

    def copies() -> dict[str, tuple]:
        with catalog.session() as s:
            rows = s.execute(select(ImageRow.id, ImageRow.score, ImageRow.safety_allowed, ImageRow.dup_stale))
            return {r.id: (r.score, r.safety_allowed, r.dup_stale) for r in rows}

    assert copies() == {a: (0.4, True, False), b: (0.6, False, False)}
    add_processed(catalog, "copy-a", "pony", 0.8, decision="block")  # upserts: the ON CONFLICT update path
    with catalog.session() as s:
        s.execute(delete(AestheticScoreRow).where(AestheticScoreRow.image_id == b))
        s.execute(delete(SafetyDecisionRow).where(SafetyDecisionRow.image_id == b))
    assert copies() == {a: (0.8, False, False), b: (None, False, False)}
    with catalog.session() as s:
        s.execute(update(ImageRow).where(ImageRow.id == a).values(dup_group=a))
    assert copies()[a][2] is True  # grouped and changed: stale until resolved
    select_images(db_settings, 1, {"pony": 1.0})
    assert copies()[a][2] is False
    # Deleting an image deletes its selection rows (a trigger in place of the foreign key's cascade).
    c = add_processed(catalog, "copy-c", "pony", 0.9)
    assert select_images(db_settings, 1, {"pony": 1.0}, name="one").image_ids == [c]
    with catalog.session() as s:
        s.execute(delete(ImageRow).where(ImageRow.id == c))
        assert s.scalar(select(func.count()).select_from(SelectionRow).where(SelectionRow.image_id == c)) == 0


def ledger_counts(catalog: Catalog) -> dict[str, dict[str, int]]:
    with catalog.session() as s:
        rows = s.execute(
            select(StageRow.stage, StageRow.status, func.count()).group_by(StageRow.stage, StageRow.status)
        )
        out: dict[str, dict[str, int]] = {}
        for stage, status, n in rows:
            out.setdefault(stage, {})[status] = n
        return out


def test_status_counts_equal_the_ledger(db_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_module, "COMPACT_AFTER", 5)  # fold the PostgreSQL deltas often
    catalog = catalog_for(db_settings.database_url)
    rng = random.Random(7)
    ids = [add_processed(catalog, f"st-{i}", "anime", 0.5) for i in range(40)]
    for round_ in range(6):
        batch = rng.sample(ids, 12)
        stage = rng.choice(["caption", "score", "persist"])
        with catalog.session() as s:
            claimed = claim_batch(s, batch, stage)
        with catalog.session() as s:
            complete_batch(s, claimed[:6], stage)
            fail_batch(s, {i: f"bad {round_}" for i in claimed[6:9]}, stage)
            wait_batch(s, claimed[9:], stage, "retry 1: unavailable")
        status = curation_status(catalog)
        assert {r.stage: (r.pending, r.running, r.waiting, r.done, r.failed) for r in status.stages} == {
            stage: tuple(by.get(k, 0) for k in ("pending", "running", "waiting", "done", "failed"))
            for stage, by in ledger_counts(catalog).items()
        }
    with catalog.session() as s:
        s.execute(update(StageRow).where(StageRow.status == "waiting").values(status="pending"))
        s.execute(delete(ImageRow).where(ImageRow.id.in_(ids[:5])))  # ledger rows go with their images
    with catalog.session() as s:
        assert stage_counts(s) == ledger_counts(catalog)
    status = curation_status(catalog)
    assert {(f.image_id, f.stage, f.reason) for f in status.failures} <= {
        (r.image_id, r.stage, r.error) for r in _failed_rows(catalog)
    }
    assert len(status.failures) == min(20, len(_failed_rows(catalog)))


def _failed_rows(catalog: Catalog) -> list[StageRow]:
    with catalog.session() as s:
        return list(s.scalars(select(StageRow).where(StageRow.status == "failed")))


def test_upgrade_backfills_an_existing_catalog(tmp_path: Path) -> None:
    """A catalog made before migration 0006: the copies, the duplicates and the counts are filled from its rows."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0005")
    old = Catalog(url, migrate=False)
    a, b, c = (fake_id(n) for n in ("old-a", "old-b", "old-c"))
    with old.session() as s:
        for image_id, status in ((a, "done"), (b, "done"), (c, "failed")):
            s.execute(
                text(
                    "INSERT INTO images (id, blob_key, category, tags, characters, is_duplicate, phash_indexed, "
                    "status, ingested_at, updated_at, dup_group) VALUES (:id, 'k.png', 'pony', '[]', '[]', 0, 0, "
                    ":status, '2026-01-01', '2026-01-01', :group)"
                ),
                {"id": image_id, "status": status, "group": min(a, b) if image_id in (a, b) else None},
            )
        for image_id, score in ((a, 0.3), (b, 0.7)):
            upsert(
                s,
                AestheticScoreRow,
                {
                    "image_id": image_id,
                    "raw": 1,
                    "score": score,
                    "score_tag": "s",
                    "model": "m",
                    "model_version": "1",
                    "head_version": "h",
                },
                keys=("image_id",),
            )
        for image_id in (a, b, c):
            s.execute(
                text(
                    "INSERT INTO safety_decisions (image_id, rating, decision, reasons, flags, unknown_characters, "
                    "codex_version, model, model_version, created_at) VALUES (:id, 'safe', 'allow', '[]', '[]', "
                    "'[]', 0, 'm', '1', '2026-01-01')"
                ),
                {"id": image_id},
            )
        s.execute(
            text(
                "INSERT INTO stages (image_id, stage, status, attempts, writes) VALUES "
                "(:a, 'caption', 'done', 1, 1), (:b, 'caption', 'done', 1, 1), (:c, 'caption', 'failed', 1, 0)"
            ),
            {"a": a, "b": b, "c": c},
        )
    old.dispose()
    catalog = Catalog(url)  # migrates to head
    try:
        with catalog.session() as s:
            rows = {r.id: r for r in s.scalars(select(ImageRow))}
            copies = [
                (rows[i].score, rows[i].safety_allowed, rows[i].is_duplicate, rows[i].dup_stale) for i in (a, b, c)
            ]
            # The group {a, b} is resolved by the upgrade: b scored better.
            assert copies == [(0.3, True, True, False), (0.7, True, False, False), (None, True, False, False)]
            assert stage_counts(s) == {"caption": {"done": 2, "failed": 1}}
        settings = Settings.from_env({}, state_dir=str(tmp_path / "state")).replace(database_url=url)
        assert select_images(settings, 5, DEFAULT_MIX).image_ids == [b]
    finally:
        catalog.dispose()
        catalog_for(url).dispose()
