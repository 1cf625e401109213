"""Pairwise preference collection: Elo ratings, choosing the next pair for a rater, storing comparisons."""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from sqlalchemy import and_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pony_common.catalog.db import Catalog, upsert
from pony_common.catalog.models import ComparisonRow, EloRatingRow, ImageRow
from pony_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

INITIAL_RATING = 1500.0
DEFAULT_K = 32.0
_PAIR_TRIES = 4
_MAX_ID_LENGTH = 64
_MAX_RATER_LENGTH = 128


def expected_score(rating: float, opponent: float) -> float:
    """Elo's expected score of `rating` against `opponent`: 1 / (1 + 10^((opponent - rating) / 400))."""
    return 1.0 / (1.0 + 10.0 ** ((opponent - rating) / 400.0))


def elo_update(rating_a: float, rating_b: float, score_a: float, k: float = DEFAULT_K) -> tuple[float, float]:
    """New ratings after one game; `score_a` is 1 (a won), 0 (b won) or 0.5 (tie). The sum is conserved."""
    delta = k * (score_a - expected_score(rating_a, rating_b))
    return rating_a + delta, rating_b - delta


def elo_probability(rating: float, reference: float = INITIAL_RATING) -> float:
    """Chance an image of `rating` wins against one of `reference` (the initial rating): a rating in (0, 1)."""
    return expected_score(rating, reference)


def replay_elo(
    games: Iterable[tuple[Hashable, Hashable, float]], k: float = DEFAULT_K
) -> tuple[dict[Hashable, float], dict[Hashable, int]]:
    """Ratings and game counts from (image_a, image_b, score_a) games played in order from INITIAL_RATING."""
    ratings: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for a, b, score_a in games:
        ra, rb = ratings.get(a, INITIAL_RATING), ratings.get(b, INITIAL_RATING)
        ratings[a], ratings[b] = elo_update(ra, rb, score_a, k)
        counts[a] = counts.get(a, 0) + 1
        counts[b] = counts.get(b, 0) + 1
    return ratings, counts


OUTCOME_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass(frozen=True)
class Pair:
    image_a: str
    image_b: str
    rating_a: float
    rating_b: float


@dataclass(frozen=True)
class Submitted:
    """The ratings after a comparison; `created` is False when the same judgement was already stored."""

    winner_rating: float
    loser_rating: float
    recorded_at: dt.datetime
    created: bool


@dataclass(frozen=True)
class _Candidate:
    image_id: str
    rating: float
    games: int


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _check_text(value: str, field: str, limit: int) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"longer than {limit} characters")
    return value


class PreferenceStore:
    """Elo ratings and comparisons in the catalog (tables elo_ratings, comparisons; candidates from images).

    A comparison is stored once per (rater, pair): the pair is kept ordered (image_a < image_b) with the
    outcome "a", "b" or "tie". Resubmitting the same judgement changes nothing; a different judgement of a
    pair the rater already judged is refused (AlreadyExists).
    """

    def __init__(
        self, catalog: Catalog, *, k: float = DEFAULT_K, sample_size: int = 256, rng: random.Random | None = None
    ) -> None:
        self.catalog = catalog
        self.k = float(k)
        self.sample_size = max(2, int(sample_size))
        self.rng = rng or random.Random()
        self._lock = threading.Lock()

    # --- choosing a pair ---

    def _candidates(self, session: Session, start: str) -> list[_Candidate]:
        """Up to sample_size images from a random point in id order (ids are hashes: a uniform sample)."""
        query = (
            select(ImageRow.id, EloRatingRow.rating, EloRatingRow.games)
            .outerjoin(EloRatingRow, EloRatingRow.image_id == ImageRow.id)
            .where(ImageRow.is_duplicate.is_(False), ImageRow.status != "failed")
        )
        rows = list(session.execute(query.where(ImageRow.id >= start).order_by(ImageRow.id).limit(self.sample_size)))
        if len(rows) < self.sample_size:
            more = query.where(ImageRow.id < start).order_by(ImageRow.id).limit(self.sample_size - len(rows))
            rows += list(session.execute(more))
        return [
            _Candidate(r.id, INITIAL_RATING if r.rating is None else float(r.rating), int(r.games or 0)) for r in rows
        ]

    def _judged(self, session: Session, rater: str, ids: list[str]) -> set[tuple[str, str]]:
        rows = session.execute(
            select(ComparisonRow.image_a, ComparisonRow.image_b).where(
                ComparisonRow.rater == rater, ComparisonRow.image_a.in_(ids), ComparisonRow.image_b.in_(ids)
            )
        )
        return {(r.image_a, r.image_b) for r in rows}

    def _pick(self, candidates: list[_Candidate], judged: set[tuple[str, str]]) -> Pair | None:
        """The least-played candidate (random among equals) against the closest-rated one not yet judged."""
        order = {c.image_id: self.rng.random() for c in candidates}
        anchors = sorted(candidates, key=lambda c: (c.games, order[c.image_id]))
        for anchor in anchors:
            partners = sorted(
                (c for c in candidates if c.image_id != anchor.image_id),
                key=lambda c: (abs(c.rating - anchor.rating), order[c.image_id]),
            )
            for partner in partners:
                key = tuple(sorted((anchor.image_id, partner.image_id)))
                if key not in judged:
                    first, second = (anchor, partner) if self.rng.random() < 0.5 else (partner, anchor)
                    return Pair(first.image_id, second.image_id, first.rating, second.rating)
        return None

    def next_pair(self, rater: str) -> Pair:
        """Two images of close current rating that `rater` has not compared; FailedPrecondition if none is left."""
        rater = _check_text(rater, "rater", _MAX_RATER_LENGTH)
        with self.catalog.session() as session:
            for _ in range(_PAIR_TRIES):
                start = f"{self.rng.getrandbits(256):064x}"
                candidates = self._candidates(session, start)
                if len(candidates) < 2:
                    raise FailedPrecondition("fewer than two images in the catalog to compare")
                pair = self._pick(candidates, self._judged(session, rater, [c.image_id for c in candidates]))
                if pair is not None:
                    return pair
                if len(candidates) < self.sample_size:
                    break  # the sample was the whole catalog
        raise FailedPrecondition(f"rater {rater!r} has judged every pair on offer")

    # --- storing a judgement ---

    def submit(self, rater: str, winner_id: str, loser_id: str, tie: bool = False) -> Submitted:
        """Stores (rater, pair, outcome, time) and updates both Elo ratings, once per rater and pair."""
        rater = _check_text(rater, "rater", _MAX_RATER_LENGTH)
        winner_id = _check_text(winner_id, "winner_id", _MAX_ID_LENGTH)
        loser_id = _check_text(loser_id, "loser_id", _MAX_ID_LENGTH)
        if winner_id == loser_id:
            raise InvalidArgument("loser_id", "must differ from winner_id")
        image_a, image_b = sorted((winner_id, loser_id))
        outcome = "tie" if tie else ("a" if winner_id == image_a else "b")
        with self._lock, self.catalog.session() as session:
            found = set(session.scalars(select(ImageRow.id).where(ImageRow.id.in_([winner_id, loser_id]))))
            for field, image in (("winner_id", winner_id), ("loser_id", loser_id)):
                if image not in found:
                    raise NotFound(f"{field}: no image {image!r} in the catalog")
            row = self._insert_comparison(session, rater, image_a, image_b, outcome)
            created = row is None
            if row is None:
                row = session.scalars(
                    select(ComparisonRow).where(
                        and_(
                            ComparisonRow.rater == rater,
                            ComparisonRow.image_a == image_a,
                            ComparisonRow.image_b == image_b,
                        )
                    )
                ).one()
            elif row.outcome != outcome:
                raise AlreadyExists(
                    f"rater {rater!r} already judged this pair ({_describe(row.outcome, image_a, image_b)})"
                )
            ratings = self._ratings(session, [image_a, image_b])
            if created:
                new_a, new_b = elo_update(ratings[image_a][0], ratings[image_b][0], OUTCOME_SCORE[outcome], self.k)
                for image, value in ((image_a, new_a), (image_b, new_b)):
                    session.execute(
                        EloRatingRow.__table__.update()
                        .where(EloRatingRow.image_id == image)
                        .values(rating=value, games=ratings[image][1] + 1)
                    )
                ratings = {image_a: (new_a, ratings[image_a][1] + 1), image_b: (new_b, ratings[image_b][1] + 1)}
            recorded_at = _aware(row.created_at)
        logger.info(
            "comparison",
            extra={
                "rater": rater,
                "image_a": image_a,
                "image_b": image_b,
                "outcome": outcome,
                "new_comparison": created,
            },
        )
        return Submitted(ratings[winner_id][0], ratings[loser_id][0], recorded_at, created)

    def _insert_comparison(
        self, session: Session, rater: str, image_a: str, image_b: str, outcome: str
    ) -> ComparisonRow | None:
        """Inserts the comparison; returns the stored row when this rater had already judged the pair."""
        existing = session.scalars(
            select(ComparisonRow).where(
                ComparisonRow.rater == rater, ComparisonRow.image_a == image_a, ComparisonRow.image_b == image_b
            )
        ).one_or_none()
        if existing is not None:
            return existing
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        stmt = (
            insert(ComparisonRow)
            .values(
                rater=rater,
                image_a=image_a,
                image_b=image_b,
                outcome=outcome,
                created_at=dt.datetime.now(dt.UTC),
            )
            .on_conflict_do_nothing(index_elements=["rater", "image_a", "image_b"])
            .returning(ComparisonRow.id)
        )
        if session.execute(stmt).scalar_one_or_none() is None:  # another process stored it first
            return session.scalars(
                select(ComparisonRow).where(
                    ComparisonRow.rater == rater, ComparisonRow.image_a == image_a, ComparisonRow.image_b == image_b
                )
            ).one()
        return None

    def _ratings(self, session: Session, ids: list[str]) -> dict[str, tuple[float, int]]:
        """Current (rating, games) of `ids`, creating rows at the initial rating; rows locked on PostgreSQL."""
        upsert(
            session,
            EloRatingRow,
            [{"image_id": i, "rating": INITIAL_RATING, "games": 0} for i in sorted(ids)],
            keys=["image_id"],
            update=[],
        )
        rows = session.execute(
            select(EloRatingRow.image_id, EloRatingRow.rating, EloRatingRow.games)
            .where(EloRatingRow.image_id.in_(ids))
            .order_by(EloRatingRow.image_id)
            .with_for_update()
        )
        return {r.image_id: (float(r.rating), int(r.games)) for r in rows}

    def rating(self, image_id: str) -> tuple[float, int]:
        """(rating, games) of one image; the initial rating when it has played no game."""
        with self.catalog.session() as session:
            row = session.get(EloRatingRow, image_id)
            return (INITIAL_RATING, 0) if row is None else (float(row.rating), int(row.games))


def _describe(outcome: str, image_a: str, image_b: str) -> str:
    if outcome == "tie":
        return "a tie"
    return f"{image_a if outcome == 'a' else image_b} won"
