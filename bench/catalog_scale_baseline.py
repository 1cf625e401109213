"""The catalog reads as they were before, kept as the baselines of bench/catalog_scale.py: before issue 14 (`status`
with one query per figure, `select` with every eligible row sorted in Python and the selection written by ORM
inserts), and before migration 0006 (`previous_*`: aggregates over the ledger, the pool joined over three tables)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from sqlalchemy import Select, String, and_, case, delete, func, insert, literal, or_, select, text, update

from pony_common.catalog.db import Catalog
from pony_common.catalog.models import TS, AestheticScoreRow, ImageRow, SafetyDecisionRow, utcnow
from services.curation.selection import plan_quotas
from services.curation.store import SelectionRow, StageRow


def legacy_status(catalog: Catalog, failures: int = 20) -> dict[str, object]:
    """The previous `curation_status` queries (same results, one statement per figure)."""
    out: dict[str, object] = {}
    with catalog.session() as s:
        out["images"] = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
        out["duplicates"] = s.scalar(select(func.count()).where(ImageRow.is_duplicate.is_(True))) or 0
        out["counts"] = s.execute(
            select(StageRow.stage, StageRow.status, func.count()).group_by(StageRow.stage, StageRow.status)
        ).all()
        out["spans"] = s.execute(
            select(StageRow.stage, func.count(), func.min(StageRow.started_at), func.max(StageRow.finished_at))
            .where(StageRow.status == "done")
            .group_by(StageRow.stage)
        ).all()
        out["failures"] = s.execute(
            select(StageRow.image_id, StageRow.stage, StageRow.error, ImageRow.source_uri)
            .join(ImageRow, ImageRow.id == StageRow.image_id)
            .where(StageRow.status == "failed")
            .order_by(StageRow.finished_at.desc())
            .limit(failures)
        ).all()
        parked = or_(StageRow.status == "waiting", and_(StageRow.status == "pending", StageRow.error.is_not(None)))
        out["retrying"] = s.execute(select(StageRow.image_id).where(parked).limit(failures)).all()
        out["waiting"] = s.scalar(select(func.count(func.distinct(StageRow.image_id))).where(parked))
        out["first"] = s.scalar(select(func.min(StageRow.started_at)).where(StageRow.stage == "caption"))
        out["last"] = s.scalar(select(func.max(StageRow.finished_at)).where(StageRow.stage == "persist"))
    return out


def legacy_resolve_duplicates(catalog: Catalog) -> int:
    """The previous `resolve_duplicates`: every grouped row into Python, one UPDATE per changed row."""
    with catalog.session() as s:
        query = (
            select(ImageRow.id, ImageRow.dup_group, ImageRow.status, ImageRow.is_duplicate, AestheticScoreRow.score)
            .outerjoin(AestheticScoreRow, AestheticScoreRow.image_id == ImageRow.id)
            .where(ImageRow.dup_group.is_not(None))
        )
        members: dict[str, list[tuple[str, str, bool, float | None]]] = defaultdict(list)
        for r in s.execute(query):
            members[r.dup_group].append((r.id, r.status, r.is_duplicate, r.score))
        s.execute(
            update(ImageRow)
            .where(ImageRow.dup_group.is_(None), ImageRow.is_duplicate.is_(True))
            .values(is_duplicate=False)
        )
        marked = 0
        for rows in members.values():
            best = min(rows, key=lambda r: (r[1] == "failed", -(r[3] if r[3] is not None else -1.0), r[0]))[0]
            for image_id, _, was_duplicate, _ in rows:
                duplicate = image_id != best
                marked += duplicate
                if duplicate != was_duplicate:
                    s.execute(update(ImageRow).where(ImageRow.id == image_id).values(is_duplicate=duplicate))
    return marked


def legacy_select_ids(catalog: Catalog, total: int, mix: Mapping[str, float], name: str) -> list[str]:
    """The previous `select_images` core: duplicates resolved row by row, eligible rows into Python, sorted, quotas,
    ORM inserts; the chosen ids in rank order."""
    legacy_resolve_duplicates(catalog)
    query = (
        select(ImageRow.id, ImageRow.category, AestheticScoreRow.score)
        .join(AestheticScoreRow, AestheticScoreRow.image_id == ImageRow.id)
        .join(SafetyDecisionRow, SafetyDecisionRow.image_id == ImageRow.id)
        .where(ImageRow.status == "done", ImageRow.is_duplicate.is_(False), SafetyDecisionRow.decision == "allow")
    )
    with catalog.session() as s:
        pool = [(r.id, r.category or "other", float(r.score)) for r in s.execute(query)]
    by_cat: dict[str, list[tuple[str, str, float]]] = {}
    for c in sorted(pool, key=lambda c: (-c[2], c[0])):
        by_cat.setdefault(c[1], []).append(c)
    quotas = plan_quotas(total, mix, {k: len(v) for k, v in by_cat.items()})
    chosen = [c for cat, n in quotas.items() for c in by_cat.get(cat, [])[:n]]
    chosen.sort(key=lambda c: (-c[2], c[0]))
    with catalog.session() as s:
        s.execute(delete(SelectionRow).where(SelectionRow.name == name))
        s.add_all(SelectionRow(name=name, image_id=c[0], rank=i, category=c[1]) for i, c in enumerate(chosen))
    return [c[0] for c in chosen]


# --- the paths as they were before migration 0006 (issue 14's first pass: aggregates and ranking in SQL over the
# joined tables, every group resolved by every select), kept as the second baseline -------------------------------


def previous_status(catalog: Catalog) -> dict[str, object]:
    """The previous `curation_status` reads: one grouped pass over the whole ledger, failures sorted over all stages."""
    out: dict[str, object] = {}
    with catalog.session() as s:
        out["images"] = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
        out["duplicates"] = s.scalar(select(func.count()).where(ImageRow.is_duplicate.is_(True))) or 0
        out["counts"] = s.execute(
            select(
                StageRow.stage,
                StageRow.status,
                func.count(),
                func.min(StageRow.started_at),
                func.max(StageRow.finished_at),
            ).group_by(StageRow.stage, StageRow.status)
        ).all()
        out["failures"] = s.execute(
            select(StageRow.image_id, StageRow.stage, StageRow.error, ImageRow.source_uri)
            .join(ImageRow, ImageRow.id == StageRow.image_id)
            .where(StageRow.status == "failed")
            .order_by(StageRow.finished_at.desc())
            .limit(20)
        ).all()
        parked = or_(StageRow.status == "waiting", and_(StageRow.status == "pending", StageRow.error.is_not(None)))
        out["retrying"] = s.execute(select(StageRow.image_id).where(parked).limit(20)).all()
        out["waiting"] = s.scalar(select(func.count(func.distinct(StageRow.image_id))).where(parked))
    return out


def _previous_eligible() -> Select:
    return (
        select(ImageRow.id, func.coalesce(ImageRow.category, "other").label("category"), AestheticScoreRow.score)
        .join(AestheticScoreRow, AestheticScoreRow.image_id == ImageRow.id)
        .join(SafetyDecisionRow, SafetyDecisionRow.image_id == ImageRow.id)
        .where(ImageRow.status == "done", ImageRow.is_duplicate.is_(False), SafetyDecisionRow.decision == "allow")
    )


def previous_resolve_duplicates(catalog: Catalog) -> None:
    """The previous full `resolve_duplicates`: every group ranked over images joined with their scores."""
    images = ImageRow.__table__
    with catalog.session() as s:
        s.execute(
            update(images)
            .where(images.c.dup_group.is_(None), images.c.is_duplicate.is_(True))
            .values(is_duplicate=False)
        )
        rank = (
            func.row_number()
            .over(
                partition_by=ImageRow.dup_group,
                order_by=(
                    case((ImageRow.status == "failed", 1), else_=0),
                    func.coalesce(AestheticScoreRow.score, -1.0).desc(),
                    ImageRow.id.collate("C"),
                ),
            )
            .label("rank")
        )
        ranked = (
            select(ImageRow.id.label("image_id"), rank)
            .outerjoin(AestheticScoreRow, AestheticScoreRow.image_id == ImageRow.id)
            .where(ImageRow.dup_group.is_not(None))
            .subquery()
        )
        duplicate = ranked.c.rank > 1
        s.execute(
            update(images)
            .where(images.c.id == ranked.c.image_id, images.c.is_duplicate != duplicate)
            .values(is_duplicate=duplicate)
        )


def previous_select_ids(catalog: Catalog, total: int, mix: Mapping[str, float], name: str) -> list[str]:
    """The previous `select_images` core on PostgreSQL: every group resolved, the pool counted over the three joined
    tables, ranked with a window over the whole pool and written by one INSERT ... SELECT; the ids in rank order."""
    previous_resolve_duplicates(catalog)
    with catalog.session() as s:
        pool = _previous_eligible().subquery()
        available = {c: n for c, n in s.execute(select(pool.c.category, func.count()).group_by(pool.c.category))}
        quotas = plan_quotas(total, mix, available)
        ids = ImageRow.id.collate("C")
        ranked = (
            _previous_eligible()
            .add_columns(
                func.row_number()
                .over(
                    partition_by=func.coalesce(ImageRow.category, "other"),
                    order_by=(AestheticScoreRow.score.desc(), ids),
                )
                .label("place"),
                ids.label("sort_id"),
            )
            .subquery()
        )
        wanted = {c: n for c, n in quotas.items() if n > 0}
        quota = case(wanted, value=ranked.c.category, else_=0) if wanted else literal(0)
        rank = func.row_number().over(order_by=(ranked.c.score.desc(), ranked.c.sort_id)) - 1
        chosen = select(
            literal(name, String).label("name"),
            ranked.c.id,
            rank.label("rank"),
            ranked.c.category,
            literal(utcnow(), TS).label("created_at"),
        ).where(ranked.c.place <= quota)
        s.execute(text("SET LOCAL work_mem = '256MB'"))
        s.execute(delete(SelectionRow).where(SelectionRow.name == name))
        s.execute(insert(SelectionRow).from_select(["name", "image_id", "rank", "category", "created_at"], chosen))
        return list(
            s.scalars(select(SelectionRow.image_id).where(SelectionRow.name == name).order_by(SelectionRow.rank))
        )
