"""Elo ratings, pair selection and stored comparisons (SQLite and PostgreSQL catalogs)."""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest
from sqlalchemy import func, select

from pony_common.catalog.db import Catalog
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from pony_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.scorer.preferences import Preferences, elo_update, expected_score, replay_elo
from services.scorer.store import INITIAL_RATING, ComparisonRow, EloRatingRow, PreferenceStore


def image_ids(n: int) -> list[str]:
    return [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in range(n)]


def add_images(catalog: Catalog, ids: list[str], ratings: dict[str, tuple[float, int]] | None = None) -> None:
    with catalog.session() as s:
        for image_id in ids:
            s.add(ImageRow(id=image_id, blob_key=f"images/{image_id}.png"))
        s.flush()
        for image_id, (rating, games) in (ratings or {}).items():
            s.add(EloRatingRow(image_id=image_id, rating=rating, games=games))


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, settings: Settings):
    url = settings.database_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    cat = Catalog(url)
    try:
        yield cat
    finally:
        cat.dispose()


def test_expected_score_and_update_follow_elo() -> None:
    assert expected_score(1500, 1500) == pytest.approx(0.5)
    assert expected_score(1900, 1500) == pytest.approx(1 / (1 + 10 ** (-1)))
    a, b = elo_update(1500, 1500, 1.0, k=32)
    assert (a, b) == pytest.approx((1516, 1484))
    a, b = elo_update(1600, 1400, 0.5, k=32)
    assert a < 1600 and b > 1400 and a + b == pytest.approx(3000)
    # an upset moves ratings more than an expected win
    assert elo_update(1400, 1600, 1.0)[0] - 1400 > elo_update(1600, 1400, 1.0)[0] - 1600


def test_replay_elo_counts_games() -> None:
    ratings, counts = replay_elo([("x", "y", 1.0), ("y", "z", 0.5), ("x", "z", 1.0)])
    assert counts == {"x": 2, "y": 2, "z": 2}
    assert ratings["x"] > ratings["y"] and ratings["x"] > ratings["z"]
    assert sum(ratings.values()) == pytest.approx(3 * INITIAL_RATING)


def test_next_pair_takes_the_least_played_image_and_its_closest_rated_partner(catalog: Catalog) -> None:
    ids = image_ids(8)
    ratings = [1000.0, 1210.0, 1390.0, 1500.0, 1540.0, 1700.0, 1810.0, 2000.0]
    table = {i: (r, 6) for i, r in zip(ids, ratings, strict=True)}
    table[ids[4]] = (1540.0, 0)  # the least-played image
    add_images(catalog, ids, table)
    prefs = Preferences(PreferenceStore(catalog), rng=random.Random(1))
    pair = prefs.next_pair("alice")
    assert {pair.image_a, pair.image_b} == {ids[4], ids[3]}
    assert {pair.rating_a, pair.rating_b} == {1540.0, 1500.0}


def test_next_pair_never_offers_a_pair_the_rater_judged_and_runs_out(catalog: Catalog) -> None:
    ids = image_ids(4)
    add_images(catalog, ids)
    prefs = Preferences(PreferenceStore(catalog), rng=random.Random(2))
    seen = set()
    for _ in range(6):
        pair = prefs.next_pair("bob")
        key = frozenset((pair.image_a, pair.image_b))
        assert key not in seen and len(key) == 2
        seen.add(key)
        prefs.submit("bob", pair.image_a, pair.image_b)
    assert seen == {frozenset(p) for p in itertools.combinations(ids, 2)}
    with pytest.raises(FailedPrecondition, match="bob"):
        prefs.next_pair("bob")
    assert prefs.next_pair("carol")  # another rater still has every pair


def test_next_pair_needs_two_images_and_a_rater(catalog: Catalog) -> None:
    prefs = Preferences(PreferenceStore(catalog))
    with pytest.raises(InvalidArgument) as err:
        prefs.next_pair("  ")
    assert err.value.field == "rater"
    add_images(catalog, image_ids(1))
    with pytest.raises(FailedPrecondition, match="fewer than two"):
        prefs.next_pair("dave")


def test_submit_stores_the_judgement_and_updates_elo_once_per_rater_and_pair(catalog: Catalog) -> None:
    a, b = sorted(image_ids(2))
    add_images(catalog, [a, b])
    prefs = Preferences(PreferenceStore(catalog), k=32)
    first = prefs.submit("erin", winner_id=b, loser_id=a)
    assert first.created
    assert (first.winner_rating, first.loser_rating) == pytest.approx((1516, 1484))
    again = prefs.submit("erin", winner_id=b, loser_id=a)
    assert not again.created
    assert (again.winner_rating, again.loser_rating) == pytest.approx((1516, 1484))
    assert again.recorded_at == first.recorded_at
    with pytest.raises(AlreadyExists):
        prefs.submit("erin", winner_id=a, loser_id=b)
    second_rater = prefs.submit("frank", winner_id=b, loser_id=a, tie=True)
    assert second_rater.created and second_rater.winner_rating < 1516
    with catalog.session() as s:
        rows = s.scalars(select(ComparisonRow).order_by(ComparisonRow.rater)).all()
        assert [(r.rater, r.image_a, r.image_b, r.outcome) for r in rows] == [
            ("erin", a, b, "b"),
            ("frank", a, b, "tie"),
        ]
        assert rows[0].created_at is not None
        assert s.scalar(select(func.sum(EloRatingRow.games))) == 4
    assert prefs.store.rating(b)[1] == 2


def test_submit_rejects_bad_and_unknown_images(catalog: Catalog) -> None:
    a, b = image_ids(2)
    add_images(catalog, [a])
    prefs = Preferences(PreferenceStore(catalog))
    with pytest.raises(InvalidArgument) as err:
        prefs.submit("gina", a, a)
    assert err.value.field == "loser_id"
    with pytest.raises(InvalidArgument) as err:
        prefs.submit("gina", "", a)
    assert err.value.field == "winner_id"
    with pytest.raises(NotFound, match="loser_id"):
        prefs.submit("gina", a, b)
