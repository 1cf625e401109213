"""The style-adherence report as ONE self-contained HTML page (inline CSS, thumbnails as data URIs, no script, no
external address): version summary, comparison and its regressions, locked content prompts, content x style
heatmaps, score-tag effect and the image grid of every cell; plus a headless-Chromium screenshot of a page.

Every string that comes from the data (prompts come from users) goes through `html.escape`; the page also carries
a Content-Security-Policy that allows no script and no fetch. The same report (and images) gives the same page."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image

from pony_common.blobs import open_uri
from services.trainer.evaluation.results import (
    CellAggregate,
    Comparison,
    ContentLocking,
    GridCell,
    ImageJudgement,
    Report,
    VersionSummary,
)

THUMB_PX = 96  # longest side of a grid thumbnail
THUMB_QUALITY = 80  # JPEG
MAX_IMAGE_BYTES = 32 << 20  # an image read from its blob URI
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'none'; base-uri 'none'"

ImageReader = Callable[[str], bytes]

# Sequential scale (viridis stops) for rates in [0, 1]; diverging blue-white-red for deltas in [-1, 1].
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_DIVERGING = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI","DejaVu Sans",sans-serif;margin:0;background:#f4f5f7;
 color:#1d2330}
main{max-width:1480px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 10px;padding-bottom:4px;border-bottom:2px solid #d5d9e0}
h3{font-size:15px;margin:18px 0 6px}
.muted{color:#5b6475}.small{font-size:12px}
section{background:#fff;border-radius:8px;padding:4px 18px 16px;margin-top:16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #d5d9e0;border-radius:6px;padding:8px 12px;min-width:150px;background:#fafbfc}
.card .v{font-size:22px;font-weight:600}.card .k{font-size:12px;color:#5b6475}
.card.bad{border-color:#c0392b;background:#fdecea}
table{border-collapse:collapse}
table.data td,table.data th{border:1px solid #e0e3e8;padding:4px 8px;text-align:right;font-variant-numeric:tabular-nums}
table.data th{background:#f0f2f5}
table.data td.t,table.data th.t{text-align:left}
table.heat{border-collapse:separate;border-spacing:2px}
table.heat th{font-weight:600;font-size:12px;vertical-align:bottom;padding:2px 4px}
table.heat th.col{min-width:74px;text-align:center}
table.heat th.row{text-align:left;max-width:260px;min-width:180px}
table.heat th.row .txt{display:block;font-weight:400;color:#5b6475;white-space:nowrap;overflow:hidden;
 text-overflow:ellipsis;max-width:260px}
table.heat td.heat{width:74px;height:34px;text-align:center;font-size:13px;font-variant-numeric:tabular-nums;
 border-radius:3px}
table.heat td.lidx{padding-left:10px;text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.locked th.row{color:#a3271b}
.badge{display:inline-block;font-size:11px;font-weight:700;color:#fff;background:#c0392b;border-radius:3px;
 padding:0 5px;margin-left:6px;vertical-align:1px}
.kind{font-weight:400;color:#5b6475;font-size:11px;display:block}
.legend{display:flex;align-items:center;gap:8px;margin:8px 0 2px;font-size:12px}
.legend .bar{width:260px;height:12px;border-radius:2px;border:1px solid #ccc}
ul.locked li{margin:4px 0}
.bars .row{display:flex;align-items:center;gap:8px;margin:3px 0;font-size:13px}
.bars .lab{width:210px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.bars .track{position:relative;width:420px;height:16px;background:#eef0f3;border-radius:2px}
.bars .fill{position:absolute;top:0;height:16px;border-radius:2px}
.bars .zero{position:absolute;top:-2px;width:1px;height:20px;background:#444}
.bars .thr{position:absolute;top:-3px;width:0;height:22px;border-left:2px dashed #c0392b}
.bars .num{width:64px;text-align:right;font-variant-numeric:tabular-nums}
.regress{border-left:4px solid #c0392b;background:#fdecea;padding:8px 12px;margin:8px 0}
.ok{border-left:4px solid #2e7d32;background:#e8f5e9;padding:8px 12px;margin:8px 0}
.content{margin-top:14px}
.cells{display:flex;flex-wrap:wrap;gap:8px}
.cell{border:1px solid #d5d9e0;border-radius:6px;padding:6px;background:#fafbfc}
.cell .h{font-size:12px;font-weight:600;margin-bottom:2px;max-width:220px}
.cell .r{font-weight:400;color:#5b6475;font-size:11px;margin:2px 0}
.thumbs{display:flex;gap:4px}
figure{margin:0;text-align:center;font-size:11px;color:#5b6475;display:flex;flex-direction:column;
 align-items:center;justify-content:flex-end}
figure img,figure .noimg{display:block;border:3px solid #c0392b;border-radius:3px}
figure.follow img,figure.follow .noimg{border-color:#2e7d32}
.noimg{background:#e0e3e8;color:#5b6475;font-size:11px;display:flex;align-items:center;justify-content:center}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _f(value: float | None) -> float:
    """A figure as a float; NaN for "no value" (None: a non-finite figure read back from JSON)."""
    return float(value) if isinstance(value, int | float) else math.nan


def _has(value: float | None) -> bool:
    return math.isfinite(_f(value))


def _num(value: float | None, fmt: str = ".2f") -> str:
    return format(value, fmt) if _has(value) else "–"


def _pct(value: float | None) -> str:
    return f"{_f(value) * 100:.0f}%" if _has(value) else "–"


def _lerp(stops: Sequence[tuple[int, int, int]], t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    a, b = stops[i], stops[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


def _fill(rgb: tuple[int, int, int]) -> str:
    """background + readable text colour."""
    lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    text = "#111" if lum > 140 else "#fff"
    return f"background:#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x};color:{text}"


def _gradient(stops: Sequence[tuple[int, int, int]]) -> str:
    return "linear-gradient(to right," + ",".join(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in stops) + ")"


def _version_label(summary: VersionSummary) -> str:
    version = "?" if summary.version is None else str(summary.version)
    adapters = "".join(f" + {a.name}:{a.weight:g}" for a in summary.adapters)
    return f"{summary.model} v{version}{adapters}"


def default_image_reader(uri: str) -> bytes:
    """Reads a judgement's `image_uri` (a blob URL the engine wrote), capped at MAX_IMAGE_BYTES."""
    return open_uri(uri, MAX_IMAGE_BYTES)


def thumbnail(png: bytes, px: int = THUMB_PX) -> tuple[str, int, int] | None:
    """(JPEG data URI, width, height) of the image downscaled to `px` on its longest side; None when the bytes
    are no image."""
    try:
        with Image.open(io.BytesIO(png)) as img:
            img.draft("RGB", (px, px))
            rgb = img.convert("RGB")
        rgb.thumbnail((px, px), Image.Resampling.LANCZOS)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"), rgb.width, rgb.height


class _Thumbs:
    """cell_id -> thumbnail (or None), from the given bytes first, then the judgement's URI."""

    def __init__(self, images: Mapping[str, bytes] | None, read_image: ImageReader | None, px: int) -> None:
        self.images = images or {}
        self.read_image = read_image
        self.px = px

    def get(self, judgement: ImageJudgement | None, cell_id: str) -> tuple[str, int, int] | None:
        data = self.images.get(cell_id)
        if data is None and judgement is not None and judgement.image_uri and self.read_image is not None:
            try:
                data = self.read_image(judgement.image_uri)
            except (OSError, ValueError):
                data = None
        return thumbnail(data, self.px) if data else None


def _weighted_follow(aggregates: Iterable[CellAggregate]) -> dict[tuple[str, str], float]:
    """(content, style) -> follow rate over its score-tag halves, weighted by image count."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for a in aggregates:
        if a.n > 0 and _has(a.follow_rate):
            s = sums[(a.content_id, a.style_id)]
            s[0] += a.follow_rate * a.n
            s[1] += a.n
    return {k: v[0] / v[1] for k, v in sums.items() if v[1] > 0}


def _excess_miss(report: Report, follow: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """(content, style) -> m(c, s) - m(s): how much more often content c misses style s than contents on average
    (the terms the locking index averages, results.py's docstring)."""
    out: dict[tuple[str, str], float] = {}
    for style in report.styles:
        misses = {c.content_id: 1.0 - follow[(c.content_id, style.style_id)]
                  for c in report.contents if (c.content_id, style.style_id) in follow}  # fmt: skip
        if misses:
            mean = sum(misses.values()) / len(misses)
            for content_id, miss in misses.items():
                out[(content_id, style.style_id)] = miss - mean
    return out


def _locked(report: Report, threshold: float) -> list[ContentLocking]:
    rows = [x for x in report.locking if _f(x.locking_index) > threshold]
    return sorted(rows, key=lambda x: (-x.locking_index, x.content_id))


def _header(report: Report) -> str:
    label = _version_label(report.summary)
    settings = ", ".join(f"{_e(k)}={_e(v)}" for k, v in sorted(report.settings.items(), key=lambda kv: str(kv[0])))
    return (
        f"<h1>Style adherence: {_e(label)}</h1>"
        f'<div class="muted">evaluation {_e(report.evaluation_id)} · {_e(report.created_at)} · '
        f"{len(report.contents)} contents × {len(report.styles)} styles · {report.summary.n_images} images</div>"
        + (f'<div class="muted small">settings: {settings}</div>' if settings else "")
    )


def _summary(report: Report, threshold: float) -> str:
    s = report.summary
    locked = _locked(report, threshold)
    cards = [
        ("follow rate", _pct(s.follow_rate), False),
        ("locking (mean max(L,0))", _num(s.locking, ".3f"), _f(s.locking) > threshold),
        ("max locking index", _num(s.max_locking, "+.3f"), _f(s.max_locking) > threshold),
        ("locked contents", str(len(locked)), bool(locked)),
        ("content similarity (CLIP)", _num(s.mean_content_similarity, ".3f"), False),
        ("score-tag effect (aesthetic Δ)", _num(s.score_tag_delta, "+.3f"), False),
        ("images", str(s.n_images), False),
        ("cost", f"{_num(report.cost.seconds, '.0f')} s", False),
    ]
    card_html = "".join(
        f'<div class="card{" bad" if bad else ""}"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for k, v, bad in cards
    )
    return (
        "<section><h2>Version summary</h2>"
        f'<div class="cards">{card_html}</div>'
        f"<h3>Locking index per content (threshold {_num(threshold, '.2f')})</h3>"
        f"{_locking_bars(report, threshold)}"
        f'<div class="muted small">L(c) = mean over styles of m(c,s) − m(s): above 0, content c overrides style '
        f"requests more often than the average content; the dashed line is the lock threshold.</div></section>"
    )


def _locking_bars(report: Report, threshold: float) -> str:
    width = 420.0
    zero = width / 2  # the track spans L in [-1, 1]

    def x(value: float) -> float:
        return zero + max(-1.0, min(1.0, value)) * zero

    rows = []
    for lock in report.locking:
        value = _f(lock.locking_index) if _has(lock.locking_index) else 0.0
        left, right = sorted((x(0.0), x(value)))
        colour = "#c0392b" if value > threshold else ("#e67e22" if value > 0 else "#2e86c1")
        rows.append(
            f'<div class="row"><span class="lab" title="{_e(lock.content_text)}">{_e(lock.content_id)}</span>'
            f'<span class="track"><span class="fill" style="left:{left:.1f}px;width:{right - left:.1f}px;'
            f'background:{colour}"></span><span class="zero" style="left:{zero:.1f}px"></span>'
            f'<span class="thr" style="left:{x(threshold):.1f}px"></span></span>'
            f'<span class="num">{_num(lock.locking_index, "+.3f")}</span></div>'
        )
    return f'<div class="bars">{"".join(rows)}</div>' if rows else '<p class="muted">No locking figures.</p>'


def _comparison(comparison: Comparison) -> str:
    b, c = comparison.base, comparison.candidate
    if comparison.regressions:
        items = "".join(f"<li>{_e(r.message)}</li>" for r in comparison.regressions)
        verdict = (
            f'<div class="regress"><b>{len(comparison.regressions)} regression(s) beyond '
            f"{_num(comparison.threshold, 'g')}"
            f"</b><ul>{items}</ul></div>"
        )
    else:
        verdict = f'<div class="ok">No regression beyond {_e(_num(comparison.threshold, "g"))}.</div>'
    figures = [
        ("follow rate", b.follow_rate, c.follow_rate),
        ("locking", b.locking, c.locking),
        ("max locking index", b.max_locking, c.max_locking),
        ("content similarity", b.mean_content_similarity, c.mean_content_similarity),
        ("score-tag effect", b.score_tag_delta, c.score_tag_delta),
    ]
    rows = "".join(
        f'<tr><td class="t">{_e(name)}</td><td>{_num(bv, ".3f")}</td><td>{_num(cv, ".3f")}</td>'
        f"<td>{_num(_f(cv) - _f(bv), '+.3f')}</td></tr>"
        for name, bv, cv in figures
    )
    rows += (
        f'<tr><td class="t">locked contents</td><td class="t">{_e(", ".join(b.locked_contents) or "–")}</td>'
        f'<td class="t">{_e(", ".join(c.locked_contents) or "–")}</td><td></td></tr>'
    )
    regressed_keys = {(r.scope, r.key) for r in comparison.regressions}
    content_rows = "".join(
        f'<tr><td class="t">{_e(k)}{_badge("regressed") if ("content", k) in regressed_keys else ""}</td>'
        f"<td>{_num(v, '+.3f')}</td></tr>"
        for k, v in sorted(comparison.content_deltas.items())
    )
    style_rows = "".join(
        f'<tr><td class="t">{_e(k)}{_badge("regressed") if ("style", k) in regressed_keys else ""}</td>'
        f"<td>{_num(v, '+.3f')}</td></tr>"
        for k, v in sorted(comparison.style_deltas.items())
    )
    return (
        f"<section><h2>Comparison: {_e(_version_label(c))} vs {_e(_version_label(b))}</h2>{verdict}"
        f'<table class="data"><tr><th class="t">figure</th><th>base</th><th>candidate</th><th>Δ</th></tr>{rows}'
        "</table>"
        '<div style="display:flex;gap:32px;flex-wrap:wrap">'
        f'<div><h3>Locking index Δ per content</h3><table class="data"><tr><th class="t">content</th><th>Δ L</th>'
        f"</tr>{content_rows}</table></div>"
        f'<div><h3>Follow rate Δ per style</h3><table class="data"><tr><th class="t">style</th><th>Δ follow</th>'
        f"</tr>{style_rows}</table></div></div></section>"
    )


def _badge(text: str) -> str:
    return f'<span class="badge">{_e(text)}</span>'


def _locked_section(report: Report, threshold: float) -> str:
    locked = _locked(report, threshold)
    styles = {s.style_id: s for s in report.styles}
    if not locked:
        body = f'<p class="ok">No content prompt locks a style (no locking index above {_num(threshold, ".2f")}).</p>'
    else:
        items = []
        for x in locked:
            worst = styles.get(x.worst_style_id)
            worst_txt = f"{worst.value} ({worst.kind})" if worst is not None else x.worst_style_id
            items.append(
                f'<li class="locked-content" data-content="{_e(x.content_id)}"><b>{_e(x.content_id)}</b> '
                f"“{_e(x.content_text)}”: locking index <b>{_num(x.locking_index, '+.3f')}</b> "
                f"(misses {_pct(x.miss_rate)} of style requests vs {_pct(x.expected_miss_rate)} on average"
                + (f"; worst style: {_e(worst_txt)}" if worst_txt else "")
                + ")</li>"
            )
        body = f'<ul class="locked">{"".join(items)}</ul>'
    return f"<section><h2>Locked content prompts (index &gt; {_num(threshold, '.2f')})</h2>{body}</section>"


def _heatmap(
    report: Report,
    values: Mapping[tuple[str, str], float],
    threshold: float,
    *,
    title: str,
    note: str,
    stops: Sequence[tuple[int, int, int]],
    lo: float,
    hi: float,
    fmt: Callable[[float], str],
    name: str,
) -> str:
    locks = {x.content_id: x for x in report.locking}
    head = "".join(
        f'<th class="col" title="{_e(s.style_id)}">{_wrap(s.value)}<span class="kind">{_e(s.kind)}'
        f"{'' if s.cluster is None else ' · c' + _e(s.cluster)}</span></th>"
        for s in report.styles
    )
    rows = []
    for content in report.contents:
        lock = locks.get(content.content_id)
        index = lock.locking_index if lock is not None else float("nan")
        locked = _f(index) > threshold
        cells = []
        for style in report.styles:
            v = values.get((content.content_id, style.style_id))
            if not _has(v):
                cells.append('<td class="heat" style="background:#e0e3e8;color:#5b6475">–</td>')
            else:
                colour = _fill(_lerp(stops, (v - lo) / (hi - lo)))
                cells.append(
                    f'<td class="heat" style="{colour}" data-content="{_e(content.content_id)}" '
                    f'data-style="{_e(style.style_id)}">{_e(fmt(v))}</td>'
                )
        row_class = ' class="locked"' if locked else ""
        rows.append(
            f'<tr{row_class}><th class="row" title="{_e(content.text)}">'
            f"{_e(content.content_id)}{_badge('locked') if locked else ''}"
            f'<span class="txt">{_e(content.text)}</span></th>{"".join(cells)}'
            f'<td class="lidx">L = {_num(index, "+.2f")}</td></tr>'
        )
    legend = (
        f'<div class="legend"><span>{_e(fmt(lo))}</span><span class="bar" style="background:{_gradient(stops)}">'
        f'</span><span>{_e(fmt(hi))}</span><span class="muted">{_e(note)}</span></div>'
    )
    return (
        f'<section><h2>{_e(title)}</h2>{legend}<table class="heat" id="heatmap-{_e(name)}"><tr><th></th>{head}'
        f'<th class="col">locking index</th></tr>{"".join(rows)}</table></section>'
    )


def _style_rates(report: Report) -> str:
    if not report.style_rates:
        return ""
    rows = "".join(
        f'<tr><td class="t">{_e(s.value)}</td><td class="t">{_e(s.kind)}</td><td>{s.n}</td>'
        f"<td>{_pct(s.follow_rate)}</td><td>{_num(s.mean_distance, '.3f')}</td></tr>"
        for s in report.style_rates
    )
    return (
        '<section><h2>Follow rate per style request</h2><table class="data"><tr><th class="t">style</th>'
        '<th class="t">kind</th><th>images</th><th>follow rate</th><th>mean distance</th></tr>'
        f"{rows}</table></section>"
    )


def _score_tags(report: Report) -> str:
    texts = {c.content_id: c.text for c in report.contents}
    effects = report.score_tag_effects
    if not effects:
        return '<section><h2>Score-tag effect</h2><p class="muted">No with/without pairs.</p></section>'
    span = max((abs(_f(e.delta)) for e in effects if _has(e.delta)), default=0.0) or 1.0
    rows = []
    for e in effects:
        label = "whole grid" if e.content_id == "" else e.content_id
        delta = _f(e.delta) if _has(e.delta) else 0.0
        w = abs(delta) / span * 80
        bar = (
            f'<span style="display:inline-block;width:{w:.1f}px;height:10px;'
            f'background:{"#2e7d32" if delta >= 0 else "#c0392b"}"></span>'
        )
        cls = ' style="font-weight:600"' if e.content_id == "" else ""
        rows.append(
            f'<tr{cls}><td class="t" title="{_e(texts.get(e.content_id, ""))}">{_e(label)}</td><td>{e.n_pairs}</td>'
            f"<td>{_num(e.mean_without, '.3f')}</td><td>{_num(e.mean_with, '.3f')}</td>"
            f'<td>{_num(e.delta, "+.3f")}</td><td class="t">{bar}</td><td>{_pct(e.win_rate)}</td></tr>'
        )
    return (
        "<section><h2>Score-tag effect (aesthetic score with vs without score tags)</h2>"
        '<table class="data"><tr><th class="t">content</th><th>pairs</th><th>without</th><th>with</th><th>Δ</th>'
        f'<th class="t"></th><th>with wins</th></tr>{"".join(rows)}</table>'
        '<div class="muted small">Pairs share content, style and seed; Δ = mean(with) − mean(without).</div></section>'
    )


def _figure(cell: GridCell, judgement: ImageJudgement | None, thumbs: _Thumbs) -> str:
    verdict = (
        "no judgement"
        if judgement is None
        else f"cluster {judgement.assigned_cluster} (asked {judgement.requested_cluster}), distance "
        f"{_num(judgement.cluster_distance, '.3f')}, aesthetic {_num(judgement.aesthetic_score, '.3f')}"
    )
    tip = _e(f"seed {cell.seed}: {cell.prompt} | {verdict}")
    thumb = thumbs.get(judgement, cell.cell_id)
    if thumb is not None:
        uri, w, h = thumb
        img = f'<img src="{uri}" width="{w}" height="{h}" alt="{tip}" title="{tip}">'
    else:
        img = f'<div class="noimg" style="width:{thumbs.px}px;height:{thumbs.px}px" title="{tip}">no image</div>'
    cls = "follow" if judgement is not None and judgement.followed else "miss"
    return f'<figure class="{cls}">{img}<figcaption>seed {cell.seed}</figcaption></figure>'


def _grids(report: Report, thumbs: _Thumbs) -> str:
    """Per content, one card per style; in it a row of seeds per score-tag state (without, then with)."""
    cells_by_key: dict[tuple[str, str, bool], list[GridCell]] = defaultdict(list)
    for cell in report.cells:
        cells_by_key[cell.group_key].append(cell)
    judged = {j.cell_id: j for j in report.judgements}
    aggs = {(a.content_id, a.style_id, a.score_tags): a for a in report.aggregates}
    score_states = sorted({c.score_tags for c in report.cells})
    parts = []
    for content in report.contents:
        cards = []
        for style in report.styles:
            rows = []
            for score_tags in score_states:
                group = cells_by_key.get((content.content_id, style.style_id, score_tags))
                if not group:
                    continue
                agg = aggs.get((content.content_id, style.style_id, score_tags))
                rate = f" · {_pct(agg.follow_rate)}" if agg is not None else ""
                figs = "".join(_figure(c, judged.get(c.cell_id), thumbs) for c in sorted(group, key=lambda c: c.seed))
                rows.append(
                    f'<div class="r">{"+ score tags" if score_tags else "no score tags"}{rate}</div>'
                    f'<div class="thumbs">{figs}</div>'
                )
            if rows:
                cluster = "" if style.cluster is None else f" · c{style.cluster}"
                cards.append(
                    f'<div class="cell" data-content="{_e(content.content_id)}" data-style="{_e(style.style_id)}">'
                    f'<div class="h">{_wrap(style.value)} <span class="r">{_e(style.kind)}{_e(cluster)}</span></div>'
                    f"{''.join(rows)}</div>"
                )
        parts.append(
            f'<div class="content"><h3>{_e(content.content_id)} <span class="muted" style="font-weight:400">'
            f'“{_e(content.text)}”</span></h3><div class="cells">{"".join(cards)}</div></div>'
        )
    return (
        "<section><h2>Images per cell</h2>"
        '<div class="muted small">Green frame: the style tagger assigned the requested cluster; red: it did not. '
        "Per style: the seeds without score tags, then with; the percentage is that row's follow rate.</div>"
        f"{''.join(parts)}</section>"
    )


def _wrap(text: str) -> str:
    """Escaped, with a line-break opportunity after each underscore (long tag names in narrow columns)."""
    return _e(text).replace("_", "_<wbr>")


def _cost(report: Report) -> str:
    c = report.cost
    return (
        f'<p class="muted small">Cost: {c.images} images, {_num(c.seconds, ".1f")} s wall '
        f"({_num(c.generate_seconds, '.1f')} s generating, {_num(c.judge_seconds, '.1f')} s judging). "
        f"Report schema {report.schema}.</p>"
    )


def render_html(
    report: Report,
    images: Mapping[str, bytes] | None = None,
    comparison: Comparison | None = None,
    *,
    read_image: ImageReader | None = default_image_reader,
    thumb_px: int = THUMB_PX,
    threshold: float | None = None,
) -> str:
    """The report page. `images`: {cell_id: PNG bytes} where the caller has them; otherwise each judgement's
    `image_uri` is read with `read_image` (None: no reading, a grey box instead). `comparison`: this report as the
    candidate against another version, its regressions named. `threshold`: the locking index above which a content
    is named locked (default the report's `lock_threshold`)."""
    if thumb_px < 8 or thumb_px > 512:
        raise ValueError(f"thumb_px must be 8..512, got {thumb_px}")
    limit = report.lock_threshold if threshold is None else threshold
    follow = _weighted_follow(report.aggregates)
    excess = _excess_miss(report, follow)
    thumbs = _Thumbs(images, read_image, thumb_px)
    body = [
        _header(report),
        _summary(report, limit),
        _comparison(comparison) if comparison is not None else "",
        _locked_section(report, limit),
        _heatmap(
            report,
            follow,
            limit,
            title="Follow rate: content × style",
            name="follow",
            note="share of images the style tagger assigns to the requested cluster (score tags on and off pooled)",
            stops=_VIRIDIS,
            lo=0.0,
            hi=1.0,
            fmt=_pct,
        ),
        _heatmap(
            report,
            excess,
            limit,
            title="Locking: excess miss rate m(c,s) − m(s)",
            name="locking",
            note="red: this content misses this style more often than contents do on average",
            stops=_DIVERGING,
            lo=-1.0,
            hi=1.0,
            fmt=lambda v: f"{v:+.2f}",
        ),
        _style_rates(report),
        _score_tags(report),
        _grids(report, thumbs),
        _cost(report),
    ]
    title = f"Style adherence: {_version_label(report.summary)}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def write_html(
    report: Report,
    path: str | Path,
    images: Mapping[str, bytes] | None = None,
    comparison: Comparison | None = None,
    **kwargs: object,
) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(report, images, comparison, **kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return target


def find_chromium() -> str | None:
    """A headless-capable Chromium on PATH (Debian's `chromium`, or Chrome), or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class ScreenshotError(RuntimeError):
    pass


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1480,
    height: int = 2400,
    chromium: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """Renders the page in headless Chromium to a PNG of width x height (the top of the page). Chromium runs with
    a throw-away profile; as root it needs --no-sandbox (the page itself runs no script: see CSP)."""
    browser = chromium or find_chromium()
    if browser is None:
        raise ScreenshotError("no Chromium found on PATH (apt-get install chromium)")
    page = Path(html_path).resolve()
    out = Path(png_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pony-chromium-") as profile:
        cmd = [
            browser,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--no-sandbox")
        cmd.append(page.as_uri())
        if out.exists():
            out.unlink()
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ScreenshotError(f"chromium did not finish within {timeout:g} s") from exc
    if not out.exists() or out.stat().st_size == 0:
        tail = proc.stderr.decode("utf-8", "replace")[-600:]
        raise ScreenshotError(f"chromium wrote no screenshot (exit {proc.returncode}): {tail}")
    return out
