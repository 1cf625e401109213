"""`ponyctl report DIR`: one self-contained HTML page (thumbnails as data URIs, charts as inline SVG) showing
every image with its captions, score, style cluster and safety decision, score and category histograms, the
selection's achieved vs target mix, and the style clusters with sample images."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from html import escape
from pathlib import Path

from PIL import Image
from sqlalchemy import select

from pony_common.blobs import BlobStore
from pony_common.catalog.db import Catalog, catalog_for
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.curation.categories import CATEGORIES
from services.curation.charts import bar_chart, histogram
from services.curation.duplicates import binary_collation
from services.curation.records import ImageRecord, load_records
from services.curation.selection import load_selection
from services.curation.status import curation_status

log = logging.getLogger(__name__)

THUMB = 160
CLUSTER_SAMPLES = 6

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.summary span{display:inline-block;margin-right:18px}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts svg{background:#fff;border:1px solid #ddd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;display:flex;gap:8px;font-size:12px}
.card img,.thumb{width:120px;height:120px;object-fit:contain;background:#eee;flex:none}
.thumb{display:flex;align-items:center;justify-content:center;color:#999}
.card.block{border-color:#e15759;background:#fff5f5}.card.failed{border-color:#999;background:#f3f3f3}
.card.dup{opacity:.6}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;margin:1px;background:#e8eef6}
.allow{background:#dff3df}.blockb{background:#f9d6d6}.fail{background:#ddd}
.cap{margin:3px 0;color:#444;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
.kind{font-weight:bold;color:#666}details{margin:3px 0;color:#444}
.cluster{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;margin-bottom:8px}
.cluster img{width:72px;height:72px;object-fit:contain;background:#eee;margin-right:4px}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}
"""


def thumbnail(data: bytes, size: int = THUMB) -> str | None:
    """A JPEG data URI of the image scaled to fit `size` px, or None when it does not decode."""
    try:
        img = Image.open(io.BytesIO(data))
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=80)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return '<div class="thumb">no preview</div>'
    return f'<img src="{uri}" alt="{escape(alt)}" loading="lazy">'


def _card(rec: ImageRecord, thumb: str | None, selected: bool) -> str:
    classes = ["card"]
    if rec.blocked:
        classes.append("block")
    if rec.status == "failed":
        classes.append("failed")
    if rec.is_duplicate:
        classes.append("dup")
    badges = [f'<span class="badge">{escape(rec.category)}</span>']
    if rec.score is not None:
        badges.append(f'<span class="badge">{rec.score:.2f} {escape(rec.score_tag or "")}</span>')
    if rec.style_tag:
        badges.append(f'<span class="badge">{escape(rec.style_tag)}</span>')
    if rec.decision:
        kind = "blockb" if rec.blocked else "allow"
        badges.append(f'<span class="badge {kind}">{escape(rec.decision)} · {escape(rec.rating or "?")}</span>')
    if rec.status == "failed":
        badges.append('<span class="badge fail">failed</span>')
    if rec.is_duplicate:
        badges.append('<span class="badge fail">duplicate</span>')
    if selected:
        badges.append('<span class="badge allow">selected</span>')
    body = ["<div>", " ".join(badges)]
    if rec.characters:
        body.append(f'<div class="cap"><span class="kind">characters</span> {escape(", ".join(rec.characters))}</div>')
    for kind in ("short", "style"):
        if rec.captions.get(kind):
            text = escape(rec.captions[kind])
            body.append(f'<div class="cap" title="{text}"><span class="kind">{kind}</span> {text}</div>')
    for kind in ("medium", "long"):
        if rec.captions.get(kind):
            body.append(f'<details><summary class="kind">{kind}</summary>{escape(rec.captions[kind])}</details>')
    if rec.palette_tags:
        body.append(f'<div class="cap"><span class="kind">palette</span> {escape(", ".join(rec.palette_tags))}</div>')
    for reason in rec.reasons if rec.blocked else []:
        text = f"{reason.get('rule_id', '')}: {reason.get('message', '')}"
        body.append(f'<div class="cap"><span class="kind">safety</span> {escape(text)}</div>')
    if rec.error:
        body.append(f'<div class="cap"><span class="kind">error</span> {escape(rec.error)}</div>')
    shown = f"{escape(rec.image_id[:16])}… {rec.width}×{rec.height}"
    body.append(f'<div class="cap" title="{escape(rec.image_id)}">{shown}</div>')
    body.append("</div>")
    return f'<div class="{" ".join(classes)}">{_img(thumb, rec.image_id)}{"".join(body)}</div>'


def render_report(
    records: list[ImageRecord],
    thumbs: dict[str, str | None],
    *,
    selected: list[str],
    mix_report: dict | None,
    status_text: str,
    title: str = "Pony curation report",
) -> str:
    """The HTML page (pure: everything it shows is passed in)."""
    chosen = set(selected)
    processed = [r for r in records if r.score is not None]
    cats = list(CATEGORIES) + sorted({r.category for r in records} - set(CATEGORIES))
    pool_counts = [sum(r.category == c for r in records) for c in cats]
    charts = [
        bar_chart(
            [f"{i / 10:.1f}" for i in range(10)],
            {"images": histogram([r.score for r in processed if r.score is not None])},
            title=f"Aesthetic scores ({len(processed)} scored images)",
        ),
        bar_chart(cats, {"pool": pool_counts}, title=f"Category mix of the pool ({len(records)} images)"),
    ]
    if mix_report and mix_report.get("categories"):
        rows = mix_report["categories"]
        charts.append(
            bar_chart(
                [r["category"] for r in rows],
                {"target": [r["target_share"] for r in rows], "achieved": [r["achieved_share"] for r in rows]},
                title=f"Selection {mix_report.get('name', '')!s}: target vs achieved mix",
                percent=True,
            )
        )
    blocked = sum(r.blocked for r in records)
    failed = sum(r.status == "failed" for r in records)
    dups = sum(r.is_duplicate for r in records)
    summary = (
        f"<span><b>{len(records)}</b> images</span><span><b>{len(processed)}</b> scored</span>"
        f"<span><b>{blocked}</b> blocked by safety</span><span><b>{failed}</b> failed</span>"
        f"<span><b>{dups}</b> near-duplicates set aside</span><span><b>{len(chosen)}</b> selected</span>"
    )
    mix_table = ""
    if mix_report and mix_report.get("categories"):
        head = "<tr><th>category</th><th>target</th><th>available</th><th>selected</th><th>achieved</th></tr>"
        body = "".join(
            f"<tr><td>{escape(r['category'])}</td><td>{r['target']} ({r['target_share']:.0%})</td>"
            f"<td>{r['available']}</td><td>{r['selected']}</td><td>{r['achieved_share']:.0%}</td></tr>"
            for r in mix_report["categories"]
        )
        short = ", ".join(f"{k} {v}" for k, v in (mix_report.get("shortfalls") or {}).items())
        note = f"<p>Shortfalls (redistributed where the pool allowed): {escape(short)}</p>" if short else ""
        mix_table = f"<h2>Selection</h2><table>{head}{body}</table>{note}"
    clusters: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        if r.style_cluster is not None:
            clusters[r.style_tag or f"cluster {r.style_cluster} (no tag: artist guard)"].append(r)
    cluster_html = []
    for tag in sorted(clusters, key=lambda t: (-len(clusters[t]), t)):
        members = sorted(clusters[tag], key=lambda r: (-(r.score or 0), r.image_id))
        families = defaultdict(int)
        for m in members:
            families[m.category] += 1
        fam = ", ".join(f"{k} {v}" for k, v in sorted(families.items(), key=lambda kv: -kv[1]))
        imgs = "".join(_img(thumbs.get(m.image_id), m.image_id) for m in members[:CLUSTER_SAMPLES])
        cluster_html.append(
            f'<div class="cluster"><b>{escape(tag)}</b> · {len(members)} image{"s" if len(members) != 1 else ""} · '
            f"{escape(fam)}<div>{imgs}</div></div>"
        )
    order = sorted(
        records,
        key=lambda r: (
            r.image_id not in chosen,
            CATEGORIES.index(r.category) if r.category in CATEGORIES else 99,
            -(r.score or -1),
            r.image_id,
        ),
    )
    cards = "".join(_card(r, thumbs.get(r.image_id), r.image_id in chosen) for r in order)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1><div class='summary'>{summary}</div>"
        f"<h2>Histograms</h2><div class='charts'>{''.join(charts)}</div>{mix_table}"
        f"<h2>Style clusters ({len(clusters)})</h2>{''.join(cluster_html) or '<p>No style clusters yet.</p>'}"
        f"<h2>Images</h2><div class='grid'>{cards}</div>"
        f"<h2>Workflow status</h2><pre>{escape(status_text)}</pre></body></html>"
    )


def report_ids(catalog: Catalog, selected: Sequence[str], limit: int) -> list[str]:
    """The `limit` images a report shows: the selection's first, then the others, each part in id order. Only these
    are read from the catalog (a report of a 1M-image catalog reads `limit` records, not 1M)."""
    chosen = set(selected)
    ids = sorted(chosen)[:limit]
    if len(ids) < limit:
        with catalog.session() as s:
            order = ImageRow.id.collate(binary_collation(s.get_bind().dialect.name))
            more = s.scalars(select(ImageRow.id).order_by(order).limit(limit + len(chosen)))
            ids += [i for i in more if i not in chosen][: limit - len(ids)]
    return ids


def write_report(settings: Settings, out_dir: str | Path, *, selection: str = "default", limit: int = 1000) -> Path:
    """Writes `out_dir/index.html` for the catalog (at most `limit` image cards: the selection first)."""
    from services.curation.status import format_status

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(
            "dir", f"{out} is a file, not a folder: give a folder for the report (it writes DIR/index.html)"
        )
    catalog = catalog_for(settings.database_url)
    selected = load_selection(catalog, selection)
    records = load_records(catalog, report_ids(catalog, selected, limit))
    blobs = BlobStore(settings.blob_url)
    thumbs: dict[str, str | None] = {}
    for r in records:
        try:
            thumbs[r.image_id] = thumbnail(blobs.get(r.blob_key))
        except (FileNotFoundError, ValueError):  # ValueError: a blob key that would leave the store
            thumbs[r.image_id] = None
    mix_report = None
    key = f"selections/{selection}.json"
    if selected and blobs.exists(key):
        mix_report = json.loads(blobs.get(key))
    html = render_report(
        records, thumbs, selected=selected, mix_report=mix_report, status_text=format_status(curation_status(catalog))
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(
            "dir", f"cannot create the folder {out} ({exc.strerror}): give a folder you can write"
        ) from None
    path = out / "index.html"
    path.write_text(html, encoding="utf-8")
    log.info("wrote report", extra={"path": str(path), "images": len(records)})
    return path
