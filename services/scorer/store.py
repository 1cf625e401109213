"""The scorer's catalog reads and writes: its tables (aesthetic_heads, comparisons, elo_ratings), head versions in
the blob store, Elo ratings and comparisons, and the rows a head fit trains on."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, catalog_for, upsert
from pony_common.catalog.models import IMAGE_FK, TS, AestheticScoreRow, Base, EmbeddingRow, ImageRow, utcnow
from pony_common.errors import AlreadyExists, DependencyUnavailable, NotFound
from pony_common.models.heads import HEAD_INFO, HEAD_WEIGHTS, HeadInfo, MLPHead, save_head

logger = logging.getLogger(__name__)

HEAD_PREFIX = "heads/aesthetic"
EMBEDDING_KIND = "clip"  # the catalog's `embeddings.kind` of the scorer's CLIP embeddings
INITIAL_RATING = 1500.0
_IN_CHUNK = 500


# --- the scorer's tables ---


class AestheticHeadRow(Base):
    __tablename__ = "aesthetic_heads"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class ComparisonRow(Base):
    """One human preference judgement; (rater, image_a, image_b) with image_a < image_b is unique."""

    __tablename__ = "comparisons"
    __table_args__ = (UniqueConstraint("rater", "image_a", "image_b", name="uq_comparisons_rater_pair"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rater: Mapped[str] = mapped_column(String(128), index=True)
    image_a: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"))
    image_b: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"))
    # "a", "b" or "tie"
    outcome: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class EloRatingRow(Base):
    __tablename__ = "elo_ratings"
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), primary_key=True)
    rating: Mapped[float] = mapped_column(Float, default=INITIAL_RATING, index=True)
    games: Mapped[int] = mapped_column(Integer, default=0)


Index("ix_comparisons_pair", ComparisonRow.image_a, ComparisonRow.image_b)


# --- opening the catalog ---


@contextmanager
def catalog_errors() -> Iterator[None]:
    """Turns a database that cannot be reached into UNAVAILABLE (the caller may retry)."""
    try:
        yield
    except OperationalError as exc:
        raise DependencyUnavailable(f"catalog database unavailable: {exc.orig}") from None


def open_catalog(url: str) -> Catalog:
    """The catalog at `url`, opened (and migrated) once per process; UNAVAILABLE when it cannot be reached."""
    with catalog_errors():
        return catalog_for(url)


# --- head versions ---


@dataclass(frozen=True)
class StoredHead:
    """A head version: its blob-store key prefix and a local folder `load_head` can read."""

    version: str
    key: str
    local_dir: Path
    active: bool


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


class HeadStore:
    """Head versions: `head.safetensors` + `head.json` under `heads/aesthetic/<version>/` in the blob store, one
    row each in aesthetic_heads, at most one active.

    The version is the first 12 hex digits of the weights' sha256, the same as `HeadInfo.version` after
    `load_head`, so the provenance a scorer reports names the row in aesthetic_heads.
    """

    def __init__(self, catalog: Catalog, blobs: BlobStore, cache_dir: str | Path) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.cache_dir = Path(cache_dir)

    def publish(self, head: MLPHead, info: HeadInfo, metrics: dict[str, Any], activate: bool) -> StoredHead:
        """Saves a new head version (idempotent for the same weights) and optionally makes it the active one."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            folder = save_head(Path(tmp) / "head", head, info)
            version = _digest(folder / HEAD_WEIGHTS)
            key = f"{HEAD_PREFIX}/{version}"
            for name in (HEAD_WEIGHTS, HEAD_INFO):
                self.blobs.put(f"{key}/{name}", (folder / name).read_bytes())
        with self.catalog.session() as session:
            upsert(
                session,
                AestheticHeadRow,
                {"version": version, "path": key, "metrics": metrics, "active": False},
                keys=["version"],
                update=["path", "metrics"],
            )
            if activate:
                session.execute(update(AestheticHeadRow).values(active=False))
                session.execute(update(AestheticHeadRow).where(AestheticHeadRow.version == version).values(active=True))
        logger.info("head published", extra={"version": version, "key": key, "active": activate})
        return StoredHead(version, key, self.local_dir(key, version), activate)

    def active(self) -> StoredHead | None:
        """The head marked active in the catalog, or None."""
        with self.catalog.session() as session:
            row = session.scalars(
                select(AestheticHeadRow)
                .where(AestheticHeadRow.active.is_(True))
                .order_by(AestheticHeadRow.created_at.desc())
            ).first()
            if row is None:
                return None
            version, key = row.version, row.path
        return StoredHead(version, key, self.local_dir(key, version), True)

    def local_dir(self, key: str, version: str) -> Path:
        """A local folder with the head's files: the blob folder itself on a local store, else a cached copy."""
        if Path(key).is_absolute() and Path(key).is_dir():
            return Path(key)
        direct = Path(self.blobs.path(key))
        if direct.is_dir() and (direct / HEAD_WEIGHTS).is_file():
            return direct
        target = self.cache_dir / version
        if not (target / HEAD_WEIGHTS).is_file():
            partial = self.cache_dir / f".partial-{version}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for name in (HEAD_WEIGHTS, HEAD_INFO):
                (partial / name).write_bytes(self.blobs.get(f"{key}/{name}"))
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        return target


# --- Elo ratings and comparisons ---


@dataclass(frozen=True)
class Candidate:
    """An image that may be offered for comparison, with its current Elo rating and games played."""

    image_id: str
    rating: float
    games: int


@dataclass(frozen=True)
class Recorded:
    """A stored comparison: (rating, games) of both images afterwards, when it was stored, and whether it is new."""

    ratings: dict[str, tuple[float, int]]
    recorded_at: dt.datetime
    created: bool


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _describe(outcome: str, image_a: str, image_b: str) -> str:
    if outcome == "tie":
        return "a tie"
    return f"{image_a if outcome == 'a' else image_b} won"


class PreferenceStore:
    """Elo ratings and comparisons in the catalog (tables elo_ratings, comparisons; candidates from images).

    A comparison is stored once per (rater, pair): the pair is kept ordered (image_a < image_b) with the
    outcome "a", "b" or "tie". Recording the same judgement again changes nothing; a different judgement of a
    pair the rater already judged is refused (AlreadyExists).
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()

    def sample(self, rater: str, start: str, size: int) -> tuple[list[Candidate], set[tuple[str, str]]]:
        """Up to `size` images from `start` on in id order, wrapping around (ids are hashes: a uniform sample),
        and the pairs among them `rater` has judged."""
        with self.catalog.session() as session:
            candidates = self._candidates(session, start, size)
            return candidates, self._judged(session, rater, [c.image_id for c in candidates])

    def _candidates(self, session: Session, start: str, size: int) -> list[Candidate]:
        query = (
            select(ImageRow.id, EloRatingRow.rating, EloRatingRow.games)
            .outerjoin(EloRatingRow, EloRatingRow.image_id == ImageRow.id)
            .where(ImageRow.is_duplicate.is_(False), ImageRow.status != "failed")
        )
        rows = list(session.execute(query.where(ImageRow.id >= start).order_by(ImageRow.id).limit(size)))
        if len(rows) < size:
            more = query.where(ImageRow.id < start).order_by(ImageRow.id).limit(size - len(rows))
            rows += list(session.execute(more))
        return [
            Candidate(r.id, INITIAL_RATING if r.rating is None else float(r.rating), int(r.games or 0)) for r in rows
        ]

    def _judged(self, session: Session, rater: str, ids: list[str]) -> set[tuple[str, str]]:
        rows = session.execute(
            select(ComparisonRow.image_a, ComparisonRow.image_b).where(
                ComparisonRow.rater == rater, ComparisonRow.image_a.in_(ids), ComparisonRow.image_b.in_(ids)
            )
        )
        return {(r.image_a, r.image_b) for r in rows}

    def record(
        self,
        rater: str,
        winner_id: str,
        loser_id: str,
        outcome: str,
        rate: Callable[[float, float], tuple[float, float]],
    ) -> Recorded:
        """Stores (rater, pair, outcome, time) once and, when new, sets both images' ratings to
        `rate(rating_a, rating_b)` and counts a game for each; the pair is (image_a, image_b) in id order.
        NotFound for an image not in the catalog, AlreadyExists when the rater judged the pair otherwise."""
        image_a, image_b = sorted((winner_id, loser_id))
        with self._lock, self.catalog.session() as session:
            found = set(session.scalars(select(ImageRow.id).where(ImageRow.id.in_([winner_id, loser_id]))))
            for field, image in (("winner_id", winner_id), ("loser_id", loser_id)):
                if image not in found:
                    raise NotFound(f"{field}: no image {image!r} in the catalog")
            row = self._insert_comparison(session, rater, image_a, image_b, outcome)
            created = row is None
            if row is None:
                row = self._comparison(session, rater, image_a, image_b)
            elif row.outcome != outcome:
                raise AlreadyExists(
                    f"rater {rater!r} already judged this pair ({_describe(row.outcome, image_a, image_b)})"
                )
            ratings = self._ratings(session, [image_a, image_b])
            if created:
                new_a, new_b = rate(ratings[image_a][0], ratings[image_b][0])
                for image, value in ((image_a, new_a), (image_b, new_b)):
                    session.execute(
                        EloRatingRow.__table__.update()
                        .where(EloRatingRow.image_id == image)
                        .values(rating=value, games=ratings[image][1] + 1)
                    )
                ratings = {image_a: (new_a, ratings[image_a][1] + 1), image_b: (new_b, ratings[image_b][1] + 1)}
            recorded_at = _aware(row.created_at)
        return Recorded(ratings, recorded_at, created)

    @staticmethod
    def _comparison(session: Session, rater: str, image_a: str, image_b: str) -> ComparisonRow:
        return session.scalars(
            select(ComparisonRow).where(
                ComparisonRow.rater == rater, ComparisonRow.image_a == image_a, ComparisonRow.image_b == image_b
            )
        ).one()

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
            return self._comparison(session, rater, image_a, image_b)
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


# --- what a head fit trains on ---


@dataclass
class FitRows:
    """Comparisons (image_a, image_b, outcome) in the order they were made, the `clip` embeddings of the images
    involved (plus a slice of scored images) and their stored scores."""

    comparisons: list[tuple[str, str, str]]
    vectors: dict[str, np.ndarray]
    scores: dict[str, float]


def _decode(vector: bytes, dim: int) -> np.ndarray | None:
    values = np.frombuffer(vector, dtype="<f4")
    return values if values.shape[0] == dim and np.isfinite(values).all() else None


def load_fit_rows(catalog: Catalog, dim: int, max_rated: int, seed: int) -> FitRows:
    """Comparisons, the finite `clip` embeddings of width `dim` of their images, up to `max_rated` more images
    with a stored score (a slice of ids from a point drawn with `seed`), and the stored scores of them all."""
    with catalog.session() as session:
        comparisons = [
            (c.image_a, c.image_b, c.outcome)
            for c in session.execute(
                select(ComparisonRow.image_a, ComparisonRow.image_b, ComparisonRow.outcome).order_by(
                    ComparisonRow.created_at, ComparisonRow.id
                )
            )
        ]
        compared = sorted({a for a, _, _ in comparisons} | {b for _, b, _ in comparisons})
        vectors: dict[str, np.ndarray] = {}
        for i in range(0, len(compared), _IN_CHUNK):
            rows = session.execute(
                select(EmbeddingRow.image_id, EmbeddingRow.vector).where(
                    EmbeddingRow.kind == EMBEDDING_KIND,
                    EmbeddingRow.dim == dim,
                    EmbeddingRow.image_id.in_(compared[i : i + _IN_CHUNK]),
                )
            )
            for image_id, vector in rows:
                decoded = _decode(vector, dim)
                if decoded is not None:
                    vectors[image_id] = decoded
        if max_rated > 0:
            start = f"{random.Random(seed).getrandbits(256):064x}"
            scored = (
                select(EmbeddingRow.image_id, EmbeddingRow.vector)
                .join(AestheticScoreRow, AestheticScoreRow.image_id == EmbeddingRow.image_id)
                .where(EmbeddingRow.kind == EMBEDDING_KIND, EmbeddingRow.dim == dim)
            )
            rows = list(
                session.execute(
                    scored.where(EmbeddingRow.image_id >= start).order_by(EmbeddingRow.image_id).limit(max_rated)
                )
            )
            if len(rows) < max_rated:
                rows += session.execute(
                    scored.where(EmbeddingRow.image_id < start)
                    .order_by(EmbeddingRow.image_id)
                    .limit(max_rated - len(rows))
                )
            for image_id, vector in rows:
                if image_id not in vectors and (decoded := _decode(vector, dim)) is not None:
                    vectors[image_id] = decoded
        ids = sorted(vectors)
        scores: dict[str, float] = {}
        for i in range(0, len(ids), _IN_CHUNK):
            rows = session.execute(
                select(AestheticScoreRow.image_id, AestheticScoreRow.score).where(
                    AestheticScoreRow.image_id.in_(ids[i : i + _IN_CHUNK])
                )
            )
            for image_id, score in rows:
                scores[image_id] = float(score)
    return FitRows(comparisons, vectors, scores)
