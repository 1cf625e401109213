"""Inline SVG bar charts for the curation report (no JavaScript, no external files)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948")


def histogram(values: Sequence[float], bins: int = 10, lo: float = 0.0, hi: float = 1.0) -> list[int]:
    """Counts of `values` in `bins` equal bins over [lo, hi] (the top edge falls in the last bin)."""
    counts = [0] * bins
    for v in values:
        if v != v:
            continue
        i = int((v - lo) / (hi - lo) * bins)
        counts[min(bins - 1, max(0, i))] += 1
    return counts


def bar_chart(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    width: int = 560,
    height: int = 240,
    percent: bool = False,
) -> str:
    """Grouped vertical bars: one group per label, one bar per series, with a legend and value labels."""
    left, right, top, bottom = 40, 10, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((v for vals in series.values() for v in vals), default=0) or 1
    group_w = plot_w / max(1, len(labels))
    bar_w = group_w * 0.8 / max(1, len(series))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" style="font: 11px sans-serif">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" style="font-weight:bold">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
    ]
    for s_i, (name, values) in enumerate(series.items()):
        color = PALETTE[s_i % len(PALETTE)]
        for i, v in enumerate(values):
            h = plot_h * v / peak
            x = left + i * group_w + group_w * 0.1 + s_i * bar_w
            y = top + plot_h - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{color}">'
                f"<title>{escape(name)} {escape(labels[i])}: {_fmt(v, percent)}</title></rect>"
            )
            if v:
                parts.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{y - 2:.1f}" text-anchor="middle">{_fmt(v, percent)}</text>'
                )
    for i, label in enumerate(labels):
        x = left + i * group_w + group_w / 2
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{escape(label)}</text>')
    if len(series) > 1:
        for s_i, name in enumerate(series):
            x = left + s_i * 110
            color = PALETTE[s_i % len(PALETTE)]
            parts.append(f'<rect x="{x}" y="{height - 14}" width="10" height="10" fill="{color}"/>')
            parts.append(f'<text x="{x + 14}" y="{height - 5}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(value: float, percent: bool) -> str:
    if percent:
        return f"{value:.0%}"
    return f"{value:g}"
