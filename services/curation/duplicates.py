"""Near-duplicate groups from perceptual hashes, and which member of each group stays eligible (the best-scored).

`dedup_new` is the incremental path (only pHashes not yet indexed are matched, against the indexed ones, and groups
only ever merge); `regroup` recomputes every group from the stored pHashes (after a change of distance, or of hashes).
Both find pairs with the block-permutation index of `hamming_index`, so neither compares every pair."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import String, any_, bindparam, case, false, func, literal, or_, select, text, true, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from pony_common.catalog.db import Catalog, catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.curation.hamming_index import pairs_between, pairs_within, parse_hex

log = logging.getLogger(__name__)

# Hashes at most this many bits apart are near-duplicates (re-encodes and resizes land within 0..4).
DEFAULT_MAX_DISTANCE = 6
IMAGES = ImageRow.__table__  # bulk reads and writes go through Core: no ORM objects or session bookkeeping
# One dedup run at a time per PostgreSQL catalog (a transaction advisory lock), so two runs never miss each
# other's new hashes.
DEDUP_LOCK_KEY = 0x706F6E795F647570  # "pony_dup"
_CHUNK = 5000  # ids per IN (...) list (SQLite allows 32766 variables per statement)


@dataclass
class DedupSummary:
    """What a dedup run did."""

    new_hashes: int = 0
    indexed_hashes: int = 0
    grouped_images: int = 0
    groups_changed: int = 0
    duplicates: int = 0
    semantic_pairs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _UnionFind:
    """Union-find over hashable nodes (path halving)."""

    def __init__(self) -> None:
        self.parent: dict[object, object] = {}

    def find(self, x: object) -> object:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: object, b: object) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


def component_labels(values: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Connected components of "within max_distance bits" over uint64 `values`: per position, the smallest position
    of its component, or -1 for a position alone in it."""
    n = len(values)
    uniq, inverse = np.unique(values, return_inverse=True)
    a, b = pairs_within(uniq, max_distance)
    roots = np.arange(len(uniq))
    if len(a):
        uf = _UnionFind()
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            uf.union(x, y)
        for node in list(uf.parent):
            roots[node] = uf.find(node)
    image_roots = roots[inverse.reshape(-1)]
    order = np.argsort(image_roots, kind="stable")  # within a component, positions stay ascending
    sorted_roots = image_roots[order]
    starts = np.flatnonzero(np.r_[True, sorted_roots[1:] != sorted_roots[:-1]])
    counts = np.diff(np.r_[starts, n])
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.where(np.repeat(counts, counts) > 1, np.repeat(order[starts], counts), -1)
    return labels


def group_ids(ids: Sequence[str], values: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> dict[str, str]:
    """Connected components of "within max_distance bits" over `ids` with uint64 pHashes `values`: image id ->
    group id (the smallest id of its group), for images in a group of two or more only."""
    if not len(ids):
        return {}
    perm = sorted(range(len(ids)), key=ids.__getitem__)
    labels = component_labels(values[np.asarray(perm, dtype=np.int64)], max_distance)
    return {ids[perm[i]]: ids[perm[labels[i]]] for i in np.flatnonzero(labels >= 0).tolist()}


def group_hashes(hashes: Mapping[str, str], max_distance: int = DEFAULT_MAX_DISTANCE) -> dict[str, str]:
    """`group_ids` over {image id: hex pHash}."""
    ids = list(hashes)
    return group_ids(ids, parse_hex([hashes[i] for i in ids]), max_distance)


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": DEDUP_LOCK_KEY})


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_groups(session: Session, changes: Mapping[str, str | None]) -> None:
    """dup_group by image id, one executemany."""
    if changes:
        session.execute(  # a Core executemany, not the ORM's bulk update
            update(IMAGES).where(IMAGES.c.id == bindparam("b_id")).values(dup_group=bindparam("b_group")),
            [{"b_id": k, "b_group": v} for k, v in changes.items()],
        )


def _mark_indexed(session: Session, ids: Sequence[str]) -> None:
    """phash_indexed = true for `ids` (PostgreSQL: one statement with an array; SQLite: IN lists)."""
    if session.get_bind().dialect.name == "postgresql":
        param = bindparam("ids", list(ids), type_=postgresql.ARRAY(String))
        session.execute(update(IMAGES).where(IMAGES.c.id == any_(param)).values(phash_indexed=True))
        return
    for chunk in _chunks(ids):
        session.execute(update(IMAGES).where(IMAGES.c.id.in_(chunk)).values(phash_indexed=True))


def regroup(catalog: Catalog, max_distance: int = DEFAULT_MAX_DISTANCE) -> int:
    """Recomputes images.dup_group over the whole catalog from the stored pHashes (every pHash is then indexed);
    returns the number of images in a group. Then marks every group's non-best members is_duplicate."""
    with catalog.session() as s:
        _lock(s)
        rows = s.execute(
            select(IMAGES.c.id, IMAGES.c.phash, IMAGES.c.dup_group).where(IMAGES.c.phash.is_not(None))
        ).all()
        ids = [r[0] for r in rows]
        groups = group_ids(ids, parse_hex([r[1] for r in rows]), max_distance)
        _write_groups(s, {r[0]: groups.get(r[0]) for r in rows if groups.get(r[0]) != r[2]})
        s.execute(
            update(IMAGES)
            .where(IMAGES.c.phash.is_not(None), IMAGES.c.phash_indexed == false())
            .values(phash_indexed=True)
        )
        # Images whose pHash went away leave their group.
        s.execute(
            update(IMAGES).where(IMAGES.c.phash.is_(None), IMAGES.c.dup_group.is_not(None)).values(dup_group=None)
        )
    resolve_duplicates(catalog)
    return len(groups)


def _indexed_hashes(session: Session) -> np.ndarray:
    """The indexed pHashes as uint64, read as ONE concatenated string (no Python object per row); hashes that are not
    16 hex digits are read one by one."""
    indexed = (IMAGES.c.phash.is_not(None), IMAGES.c.phash_indexed == true())
    plain = func.length(IMAGES.c.phash) == 16
    if session.get_bind().dialect.name == "postgresql":
        joined = func.string_agg(IMAGES.c.phash, literal(""))
    else:
        joined = func.group_concat(IMAGES.c.phash, literal(""))
    text_ = session.scalar(select(joined).where(*indexed, plain)) or ""
    try:
        values = np.frombuffer(bytes.fromhex(text_), dtype=">u8").astype(np.uint64)
    except ValueError:  # a non-hex character somewhere: parse them one by one
        values = parse_hex(list(session.scalars(select(IMAGES.c.phash).where(*indexed, plain))))
    others = list(session.scalars(select(IMAGES.c.phash).where(*indexed, ~plain)))
    return np.concatenate([values, parse_hex(others)]) if others else values


def dedup_new(catalog: Catalog, max_distance: int = DEFAULT_MAX_DISTANCE) -> DedupSummary:
    """Matches the pHashes not yet indexed against each other and against the indexed ones, merging groups
    (group id: the smallest member id); then resolves the best member of every group it touched.

    Equal to `regroup` when only images were added since the last run with the same distance (groups only merge);
    a changed distance or changed hashes need `regroup`."""
    summary = DedupSummary()
    with catalog.session() as s:
        _lock(s)
        new_rows = s.execute(
            select(IMAGES.c.id, IMAGES.c.phash).where(IMAGES.c.phash.is_not(None), IMAGES.c.phash_indexed == false())
        ).all()
        summary.new_hashes = len(new_rows)
        if not new_rows:
            return summary
        old_values = _indexed_hashes(s)
        summary.indexed_hashes = len(old_values)
        new_ids = [r[0] for r in new_rows]
        new_values = parse_hex([r[1] for r in new_rows])
        new_uniq, new_inverse = np.unique(new_values, return_inverse=True)
        old_uniq = np.unique(old_values)
        del old_values

        uf = _UnionFind()
        a, b = pairs_within(new_uniq, max_distance)
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            uf.union(("n", x), ("n", y))
        q, i = pairs_between(new_uniq, old_uniq, max_distance)
        hit_values = old_uniq[np.unique(i)] if len(i) else old_uniq[:0]
        # The indexed images holding the matched hashes, with their groups (ix_images_phash).
        hex_of = {int(v): f"{int(v):016x}" for v in hit_values.tolist()}
        old_by_hex: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        for chunk in _chunks(list(hex_of.values())):
            for r in s.execute(
                select(ImageRow.id, ImageRow.phash, ImageRow.dup_group).where(
                    ImageRow.phash.in_(chunk), ImageRow.phash_indexed == true()
                )
            ):
                old_by_hex[r.phash.lower()].append((r.id, r.dup_group))
        for qi, oi in zip(q.tolist(), i.tolist(), strict=True):
            for image_id, group in old_by_hex.get(hex_of[int(old_uniq[oi])], []):
                uf.union(("n", qi), ("g", group) if group else ("i", image_id))
        # Images sharing a new hash value are one node already; every node lists its images.
        members: dict[object, list[str]] = defaultdict(list)
        for pos, node in enumerate(new_inverse.reshape(-1).tolist()):
            members[("n", node)].append(new_ids[pos])
        touched_groups = {node[1] for node in uf.parent if node[0] == "g"}
        current: dict[str, str | None] = {}
        for chunk in _chunks(sorted(touched_groups)):
            for image_id, group in s.execute(
                select(ImageRow.id, ImageRow.dup_group).where(ImageRow.dup_group.in_(chunk))
            ):
                members[("g", group)].append(image_id)
                current[image_id] = group
        for node in uf.parent:
            if node[0] == "i":
                members[node].append(node[1])
                current[node[1]] = None
        components: dict[object, list[str]] = defaultdict(list)
        for node, images in members.items():
            components[uf.find(node)].extend(images)
        changes, final_groups = _group_changes(components.values(), current, summary)
        _write_groups(s, changes)
        summary.groups_changed = len(final_groups)
        _mark_indexed(s, new_ids)
    if final_groups:
        summary.duplicates = resolve_duplicates(catalog, groups=final_groups)
    log.info("dedup", extra=summary.as_dict())
    return summary


def _group_changes(
    components: Iterable[list[str]], current: Mapping[str, str | None], summary: DedupSummary
) -> tuple[dict[str, str | None], set[str]]:
    """Each component of two or more images is one group named by its smallest member id: the rows whose group
    changes, and the groups that exist afterwards (counted into `summary.grouped_images`)."""
    changes: dict[str, str | None] = {}
    final_groups: set[str] = set()
    for images in components:
        if len(images) < 2:
            continue
        group = min(images)
        final_groups.add(group)
        summary.grouped_images += len(images)
        changes.update({m: group for m in images if current.get(m) != group})
    return changes, final_groups


def merge_pairs(catalog: Catalog, pairs: Iterable[tuple[str, str]]) -> DedupSummary:
    """Merges the groups of each pair of image ids (e.g. semantic near-duplicates), keeping the smallest member id
    as a group's id; then resolves the best member of every group it touched."""
    summary = DedupSummary()
    uf = _UnionFind()
    ids: set[str] = set()
    for a, b in pairs:
        uf.union(a, b)
        ids.update((a, b))
        summary.semantic_pairs += 1
    if not ids:
        return summary
    with catalog.session() as s:
        _lock(s)
        current: dict[str, str | None] = {}
        for chunk in _chunks(sorted(ids)):
            rows = s.execute(select(ImageRow.id, ImageRow.dup_group).where(ImageRow.id.in_(chunk)))
            current.update({image_id: group for image_id, group in rows})
        groups = sorted({g for g in current.values() if g})
        for chunk in _chunks(groups):
            for image_id, group in s.execute(
                select(ImageRow.id, ImageRow.dup_group).where(ImageRow.dup_group.in_(chunk))
            ):
                current[image_id] = group
                uf.union(image_id, f"group:{group}")
        for image_id in ids & current.keys():
            if current[image_id]:
                uf.union(image_id, f"group:{current[image_id]}")
        components: dict[object, list[str]] = defaultdict(list)
        for image_id in current:
            components[uf.find(image_id)].append(image_id)
        changes, final_groups = _group_changes(components.values(), current, summary)
        _write_groups(s, changes)
        summary.groups_changed = len(final_groups)
    if final_groups:
        summary.duplicates = resolve_duplicates(catalog, groups=final_groups)
    return summary


def resolve_duplicates(catalog: Catalog, group: str | None = None, *, groups: Collection[str] | None = None) -> int:
    """In each group (or just `group`, or just `groups`), the best-scored member stays eligible and the rest are
    is_duplicate: one ranked UPDATE in the database, not a loop over rows. The resolved members are no longer
    dup_stale (see `resolve_stale`).

    Failed images never win; unscored ones rank below scored ones; ties go to the smallest id (deterministic).
    Returns how many images of those groups are marked duplicate."""
    selected = None if group is None and groups is None else sorted({*(groups or ()), *([group] if group else [])})
    with catalog.session() as s:
        if selected is None:
            # Images that left every group are eligible again.
            s.execute(
                update(IMAGES)
                .where(IMAGES.c.dup_group.is_(None), or_(IMAGES.c.is_duplicate == true(), IMAGES.c.dup_stale == true()))
                .values(is_duplicate=False, dup_stale=False)
            )
            _rank_groups(s, None)
            return (
                s.scalar(select(func.count()).where(ImageRow.is_duplicate == true(), ImageRow.dup_group.is_not(None)))
                or 0
            )
        marked = 0
        for chunk in _chunks(selected):
            _rank_groups(s, chunk)
            marked += (
                s.scalar(select(func.count()).where(ImageRow.is_duplicate == true(), ImageRow.dup_group.in_(chunk)))
                or 0
            )
        return marked


def resolve_stale(catalog: Catalog) -> int:
    """Resolves only the groups with a stale member: one whose group, status or score changed since its group was
    last resolved (a database trigger sets images.dup_stale; migration 0006), and clears images that left every
    group. What `select` runs before reading the pool; nothing to do costs one indexed lookup. Returns how many
    groups were resolved.

    Groups are only split by `regroup`, which resolves every group; every other change marks the changed row."""
    with catalog.session() as s:
        rows = s.execute(select(IMAGES.c.id, IMAGES.c.dup_group).where(IMAGES.c.dup_stale == true())).all()
        groups = sorted({group for _, group in rows if group is not None})
        loose = [image_id for image_id, group in rows if group is None]
        for chunk in _chunks(loose):
            s.execute(
                update(IMAGES)
                .where(IMAGES.c.id.in_(chunk), IMAGES.c.dup_group.is_(None))
                .values(is_duplicate=False, dup_stale=False)
            )
    if len(groups) > _CHUNK:
        resolve_duplicates(catalog)  # many groups (e.g. the first select after migration 0006): one pass over all
    elif groups:
        resolve_duplicates(catalog, groups=groups)
    return len(groups)


def binary_collation(dialect: str) -> str:
    """The byte-order collation of a dialect: ids ordered in SQL exactly as Python orders them."""
    return "C" if dialect == "postgresql" else "BINARY"


def _rank_groups(session: Session, groups: Sequence[str] | None) -> None:
    """is_duplicate of every member of `groups` (None: of every group) from its rank in the group, and dup_stale
    cleared; a row changed by another transaction since this one's snapshot (status, score or group no longer the
    ranked ones) is left as it is, still stale, for the next resolve."""
    rank = (
        func.row_number()
        .over(
            partition_by=IMAGES.c.dup_group,
            order_by=(
                case((IMAGES.c.status == "failed", 1), else_=0),
                func.coalesce(IMAGES.c.score, -1.0).desc(),
                IMAGES.c.id.collate(binary_collation(session.get_bind().dialect.name)),
            ),
        )
        .label("rank")
    )
    ranked = (
        select(IMAGES.c.id.label("image_id"), IMAGES.c.dup_group, IMAGES.c.status, IMAGES.c.score, rank)
        .where(IMAGES.c.dup_group.is_not(None) if groups is None else IMAGES.c.dup_group.in_(groups))
        .subquery()
    )
    duplicate = ranked.c.rank > 1
    session.execute(
        update(IMAGES)
        .where(
            IMAGES.c.id == ranked.c.image_id,
            or_(IMAGES.c.is_duplicate != duplicate, IMAGES.c.dup_stale == true()),
            IMAGES.c.dup_group == ranked.c.dup_group,
            IMAGES.c.status == ranked.c.status,
            IMAGES.c.score.is_not_distinct_from(ranked.c.score),
        )
        .values(is_duplicate=duplicate, dup_stale=False)
    )


def dedup_catalog(
    settings: Settings,
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    full: bool = False,
    semantic: bool = False,
    threshold: float | None = None,
) -> DedupSummary:
    """`ponyctl dedup`: the incremental pHash pass (or, with `full`, every group recomputed), then with `semantic`
    the embedding pass whose pairs merge into the same groups."""
    if not 0 <= max_distance <= 32:
        raise InvalidArgument("max_distance", f"must be in 0..32, got {max_distance}")
    catalog = catalog_for(settings.database_url)
    if full:
        summary = DedupSummary(grouped_images=regroup(catalog, max_distance))
        with catalog.session() as s:
            summary.indexed_hashes = s.scalar(select(func.count()).where(ImageRow.phash_indexed == true())) or 0
            summary.groups_changed = s.scalar(select(func.count(func.distinct(ImageRow.dup_group)))) or 0
            summary.duplicates = s.scalar(select(func.count()).where(ImageRow.is_duplicate == true())) or 0
    else:
        summary = dedup_new(catalog, max_distance)
    if semantic:
        from services.curation.semantic import DEFAULT_THRESHOLD, semantic_pairs

        merged = merge_pairs(catalog, semantic_pairs(catalog, DEFAULT_THRESHOLD if threshold is None else threshold))
        summary.semantic_pairs = merged.semantic_pairs
        if merged.semantic_pairs:
            with catalog.session() as s:
                summary.duplicates = s.scalar(select(func.count()).where(ImageRow.is_duplicate == true())) or 0
    return summary
