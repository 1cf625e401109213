"""The catalog at 1M+ images (issue 14): `status`, `select`, `export` and dedup on a synthetic catalog, each next to
the path it replaces in the same run.

Builds a fresh PostgreSQL database (default pony_bench_1m, dropped afterwards unless --keep) without running models,
as it was before migration 0006 (revision 0005): the rows are generated server-side (INSERT ... SELECT over
generate_series): images with pHashes (10% near copies, 1% exact) and their near-duplicate groups (written as the
pHash index finds them; --regroup runs the full regroup instead), scores, safety decisions, a caption, a style
assignment and the six stage-ledger rows per image. Then migration 0006 is timed on it (backfill of the copies on
images, every group resolved once, stage counts, indexes, triggers), and:

- dedup: 10k new images (10% near copies of indexed ones, written with the triggers on, as the workflow writes)
  matched incrementally (`dedup_new`);
- status: `curation_status` (ledger counts kept by triggers, spans and failures through indexes) vs the previous
  one (aggregates over the whole ledger);
- select: `select_images` with a 10% selection by the default mix (stale groups only, the pool one partial index,
  per category its first rows) vs the previous path (every group resolved, the pool joined over three tables and
  ranked with a window over all of it), and a check that both choose the same images in the same order;
- export: `export_selection` of a --export-total selection, blobs written first (one tiny PNG per image), without
  tokenizer or style tagger.

    .venv/bin/python bench/catalog_scale.py --keep            # 1M images (builds in minutes), kept
    .venv/bin/python bench/catalog_scale.py --reuse --keep    # measure again on the kept database
    .venv/bin/python bench/catalog_scale.py --images 200000   # smaller
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from PIL import Image
from sqlalchemy import delete, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, upgrade
from pony_common.config import Settings
from services.curation.categories import DEFAULT_MIX
from services.curation.duplicates import dedup_new, regroup
from services.curation.selection import load_selection, select_images
from services.curation.status import curation_status
from services.curation.store import SelectionRow

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"  # as in tests/conftest.py

# Deterministic 64-bit values of an integer (md5 based), as a bigint, in SQL.
H = "('x' || substr(md5({seed} || {i}::text), 1, 16))::bit(64)::bigint"
BASE_HASH = H.format(seed="'p'", i="g")
PREV_HASH = H.format(seed="'p'", i="(g - {offset})")
IMAGE_ID = "md5('img' || {i}::text) || md5('img2' || {i}::text)"
CATEGORY = (
    "CASE WHEN (g::bigint * 7919) % 100 < 10 THEN 'pony' WHEN (g::bigint * 7919) % 100 < 20 THEN 'furry' "
    "WHEN (g::bigint * 7919) % 100 < 40 THEN 'western' WHEN (g::bigint * 7919) % 100 < 65 THEN 'anime' "
    "WHEN (g::bigint * 7919) % 100 < 90 THEN 'realism' ELSE 'other' END"
)
# Every 10th image a near copy (two bits off) of image g - offset (one that is no copy itself), every 100th (offset 50)
# an exact copy.
PHASH = (
    f"lpad(to_hex(CASE WHEN g % 100 = 50 THEN {PREV_HASH} "
    f"WHEN g % 10 = 0 THEN {PREV_HASH} # (1::bigint << (g % 61)::int) # (1::bigint << ((g * 7) % 59)::int) "
    f"ELSE {BASE_HASH} END), 16, '0')"
)
STAGES = ("decode", "caption", "score", "style", "safety", "persist")


def build_sql(first: int, last: int, *, stages: bool, offset: int = 1) -> list[str]:
    """Statements that add images first..last with everything the workflow leaves behind (near copies of the image
    `offset` before)."""
    ids = "FROM bench_ids"  # g and the image id, computed once per image
    image_id = "id"
    phash = PHASH.format(offset=offset)
    sql = [
        "DROP TABLE IF EXISTS bench_ids",
        f"CREATE TEMP TABLE bench_ids AS SELECT g, {IMAGE_ID.format(i='g')} AS id "
        f"FROM generate_series({first}, {last}) AS g",
        f"""INSERT INTO images (id, blob_key, width, height, format, source_uri, source_site, category, tags,
            characters, phash, is_duplicate, phash_indexed, status, ingested_at, updated_at)
            SELECT {image_id}, 'images/' || substr({image_id}, 1, 2) || '/' || {image_id} || '.png',
                   8, 8, 'png', 'bench://' || g, 'bench', {CATEGORY}, '["tag_a", "tag_b"]', '[]', {phash}, false,
                   false, CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'done' END, now(), now() {ids}""",
        f"""INSERT INTO aesthetic_scores (image_id, raw, score, score_tag, model, model_version, head_version,
            created_at)
            SELECT {image_id}, s * 10, s, 'score_' || least(9, floor(s * 10))::int, 'm', '1', 'h', now()
            FROM (SELECT g, id, ((g::bigint * 2654435761) % 1000003) / 1000003.0 AS s {ids}) AS t""",
        f"""INSERT INTO safety_decisions (image_id, rating, decision, reasons, flags, unknown_characters,
            codex_version, model, model_version, created_at)
            SELECT {image_id}, 'safe', CASE WHEN g % 20 = 0 THEN 'block' ELSE 'allow' END, '[]', '[]', '[]', 0,
                   'm', '1', now() {ids}""",
        f"""INSERT INTO captions (image_id, kind, text, model, model_version, template_version, created_at)
            SELECT {image_id}, 'medium', 'a synthetic picture number ' || g, 'm', '1', 't', now() {ids}""",
        f"""INSERT INTO style_assignments (image_id, cluster_set_version, cluster_id, tag, distance, palette_tags,
            created_at)
            SELECT {image_id}, 'bench', g % 64, 'style_cluster_' || (g % 64), 0.1, '[]', now() {ids}""",
    ]
    if stages:
        values = ", ".join(f"('{s}')" for s in STAGES)
        sql.append(
            f"""INSERT INTO stages (image_id, stage, status, attempts, writes, error, started_at, finished_at)
            SELECT {image_id}, st.name, CASE WHEN g % 50 = 0 AND st.name = 'safety' THEN 'failed' ELSE 'done' END,
                   1, 1, CASE WHEN g % 50 = 0 AND st.name = 'safety' THEN 'bench failure' END,
                   now() - interval '1 hour' + g * interval '1 millisecond',
                   now() - interval '1 hour' + g * interval '1 millisecond' + interval '50 milliseconds'
            {ids} CROSS JOIN (VALUES {values}) AS st(name)"""
        )
    return sql


def style_set_sql() -> str:
    return """INSERT INTO style_cluster_sets (version, k, per_family, dim, centroids, clusters, params, model,
              model_version, active, created_at)
              VALUES ('bench', 64, false, 4, '\\x00', '[]', '{}', 'm', '1', true, now())"""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


def row(label: str, new_s: float, base_s: float | None, base_label: str, note: str = "") -> None:
    base = f"{base_s:>9.2f}" if base_s is not None else f"{'-':>9}"
    ratio = f"{base_s / new_s:>7.1f}x" if base_s is not None and new_s > 0 else f"{'':>8}"
    print(f"{label:<34} {new_s:>8.2f} {base:} {ratio}  {base_label:<34} {note}", flush=True)


def sql_groups(n: int) -> str:
    """The near-duplicate groups the pHash index finds in the generated images (image g, g % 10 == 0, with image
    g - 1: checked equal to `regroup` on 20k images), written directly so a build needs no full regroup."""
    pair = IMAGE_ID.format(i="g"), IMAGE_ID.format(i="(g - 1)")
    return f"""UPDATE images SET dup_group = least(p.a, p.b)
        FROM (SELECT {pair[0]} AS a, {pair[1]} AS b FROM generate_series(10, {n}, 10) AS g) AS p
        WHERE images.id IN (p.a, p.b)"""


def build(url: str, n: int, *, stages: bool, regroup_all: bool) -> Catalog:
    """The synthetic catalog as it was before migration 0006 (revision 0005), then that migration timed on it."""
    upgrade(url, "0005")
    old = Catalog(url, migrate=False)
    start = time.perf_counter()
    with old.engine.begin() as conn:
        # A bulk load: foreign-key triggers off for this session (the generated rows are consistent by design).
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text(style_set_sql()))
        for chunk in range(1, n + 1, 250_000):
            for stmt in build_sql(chunk, min(n, chunk + 249_999), stages=stages):
                conn.execute(text(stmt))
        if not regroup_all:
            conn.execute(text(sql_groups(n)))
            conn.execute(text("UPDATE images SET phash_indexed = true"))
    vacuum(old)
    old.dispose()
    print(f"built in {time.perf_counter() - start:.1f} s (revision 0005)", flush=True)
    if regroup_all:
        catalog = Catalog(url, migrate=False)
        full_s, grouped = timed(lambda: regroup(catalog))
        print(f"full regroup of {n:,} pHashes: {full_s:.1f} s, {grouped:,} grouped", flush=True)
        catalog.dispose()
    upgrade_s, _ = timed(lambda: upgrade(url))
    print(f"migration 0006 on {n:,} images (backfill, group resolve, indexes, triggers): {upgrade_s:.1f} s", flush=True)
    catalog = Catalog(url)
    vacuum(catalog)
    return catalog


def vacuum(catalog: Catalog) -> None:
    with catalog.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=10_000, help="images added for the incremental dedup")
    parser.add_argument("--export-total", type=int, default=10_000, help="images in the exported selection")
    parser.add_argument("--db", default="pony_bench_1m")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", action="store_true", help="measure on the kept database --db (no build)")
    parser.add_argument("--regroup", action="store_true", help="group the pHashes with a full regroup (minutes)")
    parser.add_argument("--no-stages", action="store_true", help="no stage-ledger rows (6 per image)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the previous select/status paths")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from bench.catalog_scale_baseline import previous_select_ids, previous_status

    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{args.db}"
    if not args.reuse:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{args.db}"')
    work = Path(tempfile.mkdtemp(prefix="catalog-scale-"))
    settings = Settings.from_env({}, state_dir=str(work / "state"), log_level="WARNING").replace(database_url=url)
    catalog = None
    try:
        if args.reuse:
            catalog = Catalog(url)
        else:
            print(f"synthetic catalog: {args.images:,} images in PostgreSQL database {args.db}", flush=True)
            catalog = build(url, args.images, stages=not args.no_stages, regroup_all=args.regroup)
        with catalog.session() as s:
            n = s.scalar(text("SELECT count(*) FROM images"))
        print()
        print(f"{'operation':<34} {'new s':>8} {'base s':>9} {'ratio':>8}  {'baseline':<34} note")
        # New images as the workflow leaves them (triggers on: they keep the copies and the counts), near copies
        # of indexed ones, then matched incrementally.
        with catalog.engine.begin() as conn:
            for stmt in build_sql(n + 1, n + args.new, stages=not args.no_stages, offset=n + 1):
                conn.execute(text(stmt))
        inc_s, summary = timed(lambda: dedup_new(catalog))
        again_s, _ = timed(lambda: dedup_new(catalog))
        row(
            f"dedup: {args.new:,} new into {n:,}",
            inc_s,
            None,
            "",
            f"{summary.new_hashes:,} new, {summary.grouped_images:,} in touched groups; no-op rerun {again_s:.2f} s",
        )
        n += args.new
        status_s, status = timed(lambda: curation_status(catalog))
        base_s = None if args.no_baseline else timed(lambda: previous_status(catalog))[0]
        row("status", status_s, base_s, "ledger aggregates (previous)", f"{sum(status.images.values()):,} images")
        total = n // 10
        select_s, report = timed(lambda: select_images(settings, total, DEFAULT_MIX, name="bench"))
        again_s, again = timed(lambda: select_images(settings, total, DEFAULT_MIX, name="bench"))
        note = f"{report.selected:,} selected; the same again {again_s:.2f} s"
        base_s = None
        if not args.no_baseline:
            base_s, previous_ids = timed(lambda: previous_select_ids(catalog, total, DEFAULT_MIX, "bench-previous"))
            same = previous_ids == report.image_ids == again.image_ids
            note += "; same images as the previous path: " + ("yes" if same else "NO")
        row(f"select: 10% ({total:,}) by mix", select_s, base_s, "joined pool, all groups (previous)", note)
        ids_s, ids = timed(lambda: load_selection(catalog, "bench"))
        row("read a selection in rank order", ids_s, None, "", f"{len(ids):,} ids")
        select_images(settings, args.export_total, DEFAULT_MIX, name="bench-export")
        blobs = BlobStore(settings.blob_url)
        png = tiny_png()
        export_ids = load_selection(catalog, "bench-export")
        with catalog.session() as s:
            rows = s.execute(text("SELECT id, blob_key FROM images WHERE id = ANY(:ids)"), {"ids": export_ids})
            keys = {image_id: key for image_id, key in rows}
        for key in keys.values():
            blobs.put(key, png)
        from services.curation.export import export_selection

        export_s, summary_x = timed(
            lambda: export_selection(settings, work / "export", name="bench-export", assign_missing_styles=False)
        )
        row(
            f"export: {args.export_total:,} images",
            export_s,
            None,
            "",
            f"{summary_x.rows:,} rows, {export_s / max(1, summary_x.rows) * 1000:.2f} ms/image "
            f"(projected {total:,}: {export_s / max(1, summary_x.rows) * total:.0f} s)",
        )
        with catalog.session() as s:
            s.execute(delete(SelectionRow).where(SelectionRow.name.in_(["bench-previous"])))
    finally:
        if catalog is not None:
            catalog.dispose()
        if not args.keep:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
