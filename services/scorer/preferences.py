"""Pairwise preference collection: Elo ratings, choosing the next pair for a rater, recording judgements."""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from pony_common.errors import FailedPrecondition, InvalidArgument
from services.scorer.store import INITIAL_RATING, Candidate, PreferenceStore

logger = logging.getLogger(__name__)

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


def _check_text(value: str, field: str, limit: int) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"longer than {limit} characters")
    return value


def pick_pair(candidates: list[Candidate], judged: set[tuple[str, str]], rng: random.Random) -> Pair | None:
    """The least-played candidate (random among equals) against the closest-rated one not yet judged."""
    order = {c.image_id: rng.random() for c in candidates}
    anchors = sorted(candidates, key=lambda c: (c.games, order[c.image_id]))
    for anchor in anchors:
        partners = sorted(
            (c for c in candidates if c.image_id != anchor.image_id),
            key=lambda c: (abs(c.rating - anchor.rating), order[c.image_id]),
        )
        for partner in partners:
            key = tuple(sorted((anchor.image_id, partner.image_id)))
            if key not in judged:
                first, second = (anchor, partner) if rng.random() < 0.5 else (partner, anchor)
                return Pair(first.image_id, second.image_id, first.rating, second.rating)
    return None


class Preferences:
    """Elo preference collection over the catalog's images and comparisons (`PreferenceStore`).

    A judgement is stored once per (rater, pair) and moves both images' Elo ratings (factor `k`) once; the
    same judgement again changes nothing, a different one is refused (AlreadyExists).
    """

    def __init__(
        self, store: PreferenceStore, *, k: float = DEFAULT_K, sample_size: int = 256, rng: random.Random | None = None
    ) -> None:
        self.store = store
        self.k = float(k)
        self.sample_size = max(2, int(sample_size))
        self.rng = rng or random.Random()

    def next_pair(self, rater: str) -> Pair:
        """Two images of close current rating that `rater` has not compared; FailedPrecondition if none is left."""
        rater = _check_text(rater, "rater", _MAX_RATER_LENGTH)
        for _ in range(_PAIR_TRIES):
            start = f"{self.rng.getrandbits(256):064x}"
            candidates, judged = self.store.sample(rater, start, self.sample_size)
            if len(candidates) < 2:
                raise FailedPrecondition("fewer than two images in the catalog to compare")
            pair = pick_pair(candidates, judged, self.rng)
            if pair is not None:
                return pair
            if len(candidates) < self.sample_size:
                break  # the sample was the whole catalog
        raise FailedPrecondition(f"rater {rater!r} has judged every pair on offer")

    def submit(self, rater: str, winner_id: str, loser_id: str, tie: bool = False) -> Submitted:
        """Stores (rater, pair, outcome, time) and updates both Elo ratings, once per rater and pair."""
        rater = _check_text(rater, "rater", _MAX_RATER_LENGTH)
        winner_id = _check_text(winner_id, "winner_id", _MAX_ID_LENGTH)
        loser_id = _check_text(loser_id, "loser_id", _MAX_ID_LENGTH)
        if winner_id == loser_id:
            raise InvalidArgument("loser_id", "must differ from winner_id")
        image_a, image_b = sorted((winner_id, loser_id))
        outcome = "tie" if tie else ("a" if winner_id == image_a else "b")
        recorded = self.store.record(
            rater,
            winner_id,
            loser_id,
            outcome,
            lambda rating_a, rating_b: elo_update(rating_a, rating_b, OUTCOME_SCORE[outcome], self.k),
        )
        logger.info(
            "comparison",
            extra={
                "rater": rater,
                "image_a": image_a,
                "image_b": image_b,
                "outcome": outcome,
                "new_comparison": recorded.created,
            },
        )
        ratings = recorded.ratings
        return Submitted(ratings[winner_id][0], ratings[loser_id][0], recorded.recorded_at, recorded.created)
