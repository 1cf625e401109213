"""Dataset selection: meet a category mix as closely as the pool allows, best scores first, deterministically.

`plan_quotas` is the pure part (how many per category); `select_images` reads the eligible pool from the
catalog (processed, allowed by safety, not a near-duplicate, score >= min), writes the `selections` rows and
a JSON report of target vs achieved mix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    delete,
    false,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    true,
    union_all,
)
from sqlalchemy.orm import Session

from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, catalog_for
from pony_common.catalog.models import TS, ImageRow, utcnow
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.curation.categories import CATEGORIES, DEFAULT_MIX, normalize_category
from services.curation.duplicates import binary_collation, resolve_stale
from services.curation.store import SelectionRow

log = logging.getLogger(__name__)


MIX_TOLERANCE = 1e-6


def parse_mix(text: str) -> dict[str, float]:
    """`pony=0.10,furry=0.10,...` -> the shares per category; InvalidArgument("mix") on bad names or numbers and on
    shares that do not add up to 1 (within MIX_TOLERANCE): a mix is never silently rescaled."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        category = normalize_category(name)
        if not sep or category is None:
            raise InvalidArgument(
                "mix", f"{part!r} is not CATEGORY=WEIGHT with CATEGORY one of {', '.join(CATEGORIES)}"
            )
        try:
            weight = float(value)
        except ValueError:
            raise InvalidArgument("mix", f"weight of {name.strip()} is not a number: {value!r}") from None
        if weight < 0 or weight != weight:
            raise InvalidArgument("mix", f"weight of {name.strip()} must be >= 0")
        mix[category] = mix.get(category, 0.0) + weight
    total = sum(mix.values())
    if total <= 0:
        raise InvalidArgument("mix", "the weights sum to 0")
    if abs(total - 1.0) > MIX_TOLERANCE:
        raise InvalidArgument(
            "mix",
            f"the shares sum to {total:g}, not 1 (tolerance {MIX_TOLERANCE:g}): give shares that add up to 1, "
            f"e.g. {','.join(f'{c}={w / total:.4g}' for c, w in mix.items())}",
        )
    return mix


def _apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder split of `total` by `weights` (ties broken by CATEGORIES order)."""
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        return {c: 0 for c in weights}
    exact = {c: total * w / wsum for c, w in weights.items()}
    out = {c: int(v) for c, v in exact.items()}
    order = sorted(weights, key=lambda c: (-(exact[c] - out[c]), _rank(c)))
    for c in order[: total - sum(out.values())]:
        out[c] += 1
    return out


def _rank(category: str) -> int:
    return CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)


def plan_quotas(total: int, mix: Mapping[str, float], available: Mapping[str, int]) -> dict[str, int]:
    """How many images per category: the mix's share of `total`, capped by what is available; a shortfall is
    handed to the categories that still have spare images, in proportion to their mix weights (repeated until
    nothing is left to hand out or no category has spare images). Categories outside the mix get nothing."""
    cats = [c for c in sorted(mix, key=_rank) if mix[c] > 0]
    quota = {c: 0 for c in cats}
    remaining = total
    open_cats = [c for c in cats if available.get(c, 0) > 0]
    while remaining > 0 and open_cats:
        share = _apportion(remaining, {c: mix[c] for c in open_cats})
        given = 0
        for c in open_cats:
            take = min(share[c], available.get(c, 0) - quota[c])
            quota[c] += take
            given += take
        remaining -= given
        # Each round gives at least one image (shares sum to `remaining` over categories with spare ones),
        # so this ends after at most one round per category.
        open_cats = [c for c in open_cats if available.get(c, 0) > quota[c]]
    return quota


@dataclass
class CategoryReport:
    category: str
    target_share: float
    target: int
    available: int
    selected: int
    achieved_share: float
    shortfall: int


@dataclass
class SelectionReport:
    name: str
    total: int
    selected: int
    min_score: float | None
    categories: list[CategoryReport] = field(default_factory=list)
    # Categories that could not meet their target, with how many images they lacked.
    shortfalls: dict[str, int] = field(default_factory=dict)
    image_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("image_ids")
        return out

    def table(self) -> str:
        """The achieved vs target mix as aligned text."""
        lines = [f"{'category':<10} {'target':>7} {'share':>6} {'avail':>6} {'chosen':>7} {'share':>6} {'short':>6}"]
        for r in self.categories:
            lines.append(
                f"{r.category:<10} {r.target:>7} {r.target_share:>6.1%} {r.available:>6} {r.selected:>7} "
                f"{r.achieved_share:>6.1%} {r.shortfall:>6}"
            )
        lines.append(f"selected {self.selected} of {self.total} requested (selection {self.name!r})")
        if self.shortfalls:
            short = ", ".join(f"{c} short by {n}" for c, n in self.shortfalls.items())
            lines.append(f"shortfalls (redistributed where the pool allowed): {short}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Candidate:
    image_id: str
    category: str
    score: float


def eligible_pool(catalog: Catalog, min_score: float | None = None) -> list[Candidate]:
    """Processed images allowed by safety, not near-duplicates, scored at least `min_score` (into Python: for small
    pools and tests; `select_images` ranks the pool in the database)."""
    with catalog.session() as s:
        return [Candidate(r.id, r.category, float(r.score)) for r in s.execute(_eligible(min_score))]


def choose(
    pool: list[Candidate], total: int, mix: Mapping[str, float]
) -> tuple[list[Candidate], dict[str, int], dict[str, int]]:
    """The selection from a pool: per category the highest scores (ties: smaller id). Returns
    (chosen in rank order, quotas, the mix's plain targets)."""
    by_cat: dict[str, list[Candidate]] = {}
    for c in sorted(pool, key=lambda c: (-c.score, c.image_id)):
        by_cat.setdefault(c.category, []).append(c)
    quotas = plan_quotas(total, mix, {k: len(v) for k, v in by_cat.items()})
    chosen = [c for cat, n in quotas.items() for c in by_cat.get(cat, [])[:n]]
    chosen.sort(key=lambda c: (-c.score, c.image_id))
    return chosen, quotas, _apportion(total, mix)


def _in_pool(min_score: float | None) -> list[ColumnElement[bool]]:
    """The eligible pool as terms on `images` alone: processed, allowed by safety, not a near-duplicate, scored (the
    score and the safety decision are copied onto images by triggers; migration 0006). The same terms as the
    partial index `ix_images_pool` (category, score desc, id), literals included, so the index serves every query."""
    terms = [
        ImageRow.status == literal_column("'done'"),
        ImageRow.is_duplicate == false(),
        ImageRow.safety_allowed == true(),
        ImageRow.score.is_not(None),
    ]
    if min_score is not None:
        terms.append(ImageRow.score >= min_score)
    return terms


def _eligible(min_score: float | None) -> Select:
    """id, category and score of the eligible pool (the query `eligible_pool` reads)."""
    return select(ImageRow.id, ImageRow.category.label("category"), ImageRow.score).where(*_in_pool(min_score))


def pool_counts(session: Session, min_score: float | None = None) -> dict[str, int]:
    """Eligible images per category (an index-only count of `ix_images_pool`)."""
    query = select(ImageRow.category, func.count()).where(*_in_pool(min_score)).group_by(ImageRow.category)
    return {c: n for c, n in session.execute(query)}


def _write_selection(s: Session, name: str, min_score: float | None, quotas: Mapping[str, int]) -> list[str]:
    """Replaces selection `name` with the best `quotas[category]` of each category, ranked by score (ties: smaller
    id), in one INSERT ... SELECT: per category the first rows of `ix_images_pool` (no sort, nothing else read),
    then one sort of the chosen rows for their rank. Returns the chosen ids in rank order."""
    ids = ImageRow.id.collate(binary_collation(s.get_bind().dialect.name))
    parts = []
    for category in sorted((c for c, n in quotas.items() if n > 0), key=_rank):
        best = (
            select(ImageRow.id, ImageRow.category, ImageRow.score, ids.label("sort_id"))
            .where(*_in_pool(min_score), ImageRow.category == category)
            .order_by(ImageRow.score.desc(), ids)
            .limit(quotas[category])
            .subquery()
        )
        parts.append(select(best))  # each part its own subquery: SQLite allows no LIMIT inside a compound SELECT
    s.execute(delete(SelectionRow).where(SelectionRow.name == name))
    if not parts:
        return []
    chosen = (parts[0] if len(parts) == 1 else union_all(*parts)).subquery()
    rank = func.row_number().over(order_by=(chosen.c.score.desc(), chosen.c.sort_id)) - 1
    rows = select(
        literal(name, String).label("name"),
        chosen.c.id,
        rank.label("rank"),
        chosen.c.category,
        literal(utcnow(), TS).label("created_at"),
    )
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SET LOCAL work_mem = '64MB'"))  # sort the chosen rows in memory, not in temporary files
    back = s.execute(
        insert(SelectionRow)
        .from_select(["name", "image_id", "rank", "category", "created_at"], rows)
        .returning(SelectionRow.image_id, SelectionRow.rank)
    )
    return [image_id for image_id, _ in sorted(back, key=lambda r: r[1])]


def select_images(
    settings: Settings,
    total: int,
    mix: Mapping[str, float] | None = None,
    *,
    min_score: float | None = None,
    name: str = "default",
) -> SelectionReport:
    """`ponyctl select`: writes selection `name` (replacing it) and returns target vs achieved mix. Near-duplicate
    groups changed since they were last resolved are resolved first; the pool is counted and ranked in the database
    on one partial index (a 10% selection of a 1M-image catalog takes seconds)."""
    if total < 1:
        raise InvalidArgument("total", "must be at least 1")
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise InvalidArgument("min_score", "must be in [0, 1]")
    mix = dict(mix or DEFAULT_MIX)
    catalog = catalog_for(settings.database_url)
    resolve_stale(catalog)
    with catalog.session() as s:
        available = pool_counts(s, min_score)
        quotas = plan_quotas(total, mix, available)
        targets = _apportion(total, mix)
        chosen = _write_selection(s, name, min_score, quotas)
    report = SelectionReport(name=name, total=total, selected=len(chosen), min_score=min_score, image_ids=chosen)
    for cat in sorted(mix, key=_rank):
        got = quotas.get(cat, 0)
        report.categories.append(
            CategoryReport(
                category=cat,
                target_share=mix[cat],
                target=targets.get(cat, 0),
                available=available.get(cat, 0),
                selected=got,
                achieved_share=got / len(chosen) if chosen else 0.0,
                shortfall=max(0, targets.get(cat, 0) - got),
            )
        )
        if targets.get(cat, 0) > available.get(cat, 0):
            report.shortfalls[cat] = targets[cat] - available.get(cat, 0)
    BlobStore(settings.blob_url).put(f"selections/{name}.json", json.dumps(report.as_dict(), indent=2).encode())
    log.info("selected", extra={"selection": name, "selected": len(chosen), "shortfalls": report.shortfalls})
    return report


def load_selection(catalog: Catalog, name: str) -> list[str]:
    """The image ids of selection `name` in rank order (empty when there is no such selection)."""
    with catalog.session() as s:
        return list(
            s.scalars(select(SelectionRow.image_id).where(SelectionRow.name == name).order_by(SelectionRow.rank))
        )
