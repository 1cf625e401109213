"""The figures of a style-adherence report, computed from judged grid cells: per-cell aggregates, the locking index
per content prompt, follow rates per style, the score-tag effect, the version summary, and the comparison of two
reports with the regressions named.

Definitions (an image *follows* its style request when the style tagger assigns it the requested cluster):

- m(c, s), the miss rate of content c under style s: the share of c's images asking for s (every seed, score tags
  on and off) that do not follow s.
- m(s), that style's rate over all contents: the mean of m(c, s) over the contents.
- L(c), the locking index of content c: the mean over styles s of m(c, s) - m(s). It lies in [-1, 1]; 0 means c
  overrides style requests as often as the average content does, > 0 that c overrides them more often (c "locks"
  a style: "portrait" forcing a photo look whatever style is asked). Subtracting m(s) takes out styles the model
  cannot do for any content: those are a follow-rate problem, not locking.
- Content c is *locked* when L(c) > the report's lock threshold.
- The summary locking of a version: the mean over contents of max(L(c), 0) (how much, on average, contents lock
  beyond the average); max locking: the largest L(c).
- Score-tag effect: mean aesthetic score with score tags minus without, over pairs of images that share content,
  style and seed.

A comparison names a regression when the candidate's summary locking, or a content's locking max(L(c), 0), rises
by more than the threshold over the base's, or the overall follow rate falls by more than it. (The positive part:
a content that went from locking less than average to average has not started to lock.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from statistics import fmean

from services.trainer.evaluation.results import (
    Adapter,
    CellAggregate,
    Comparison,
    ContentLocking,
    ContentPrompt,
    GridCell,
    ImageJudgement,
    Regression,
    Report,
    ScoreTagEffect,
    StyleFollowRate,
    StyleRequest,
    VersionSummary,
)

DEFAULT_LOCK_THRESHOLD = 0.25
DEFAULT_COMPARE_THRESHOLD = 0.1  # a comparison asked for without a gate threshold (PONY_EVAL_MAX_LOCKING_REGRESSION 0)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return fmean(values) if values else 0.0


def _pairs(cells: Sequence[GridCell], judgements: Sequence[ImageJudgement]) -> list[tuple[GridCell, ImageJudgement]]:
    """Cells with their judgement (cells without one, e.g. blocked by the safety check, are left out)."""
    by_id = {j.cell_id: j for j in judgements}
    return [(c, by_id[c.cell_id]) for c in cells if c.cell_id in by_id]


def resolve_style_clusters(cells: Sequence[GridCell], assigned: dict[str, int]) -> dict[str, int]:
    """The cluster each style request is judged against: a cluster request's own cluster; for a source or word
    request, the cluster the style tagger assigned most often to its images over the whole grid (ties: the lowest
    id). `assigned` maps cell id -> assigned cluster."""
    votes: dict[str, Counter[int]] = defaultdict(Counter)
    out: dict[str, int] = {}
    for cell in cells:
        if cell.style.cluster is not None:
            out[cell.style.style_id] = cell.style.cluster
        elif cell.cell_id in assigned:
            votes[cell.style.style_id][assigned[cell.cell_id]] += 1
    for style_id, counter in votes.items():
        if style_id not in out:
            best = max(counter.values())
            out[style_id] = min(c for c, n in counter.items() if n == best)
    return out


def aggregate_cells(cells: Sequence[GridCell], judgements: Sequence[ImageJudgement]) -> tuple[CellAggregate, ...]:
    groups: dict[tuple[str, str, bool], list[tuple[GridCell, ImageJudgement]]] = defaultdict(list)
    for cell, judged in _pairs(cells, judgements):
        groups[cell.group_key].append((cell, judged))
    out = []
    for (content_id, style_id, score_tags), items in groups.items():
        js = [j for _, j in items]
        out.append(
            CellAggregate(
                content_id=content_id,
                style_id=style_id,
                score_tags=score_tags,
                n=len(js),
                follow_rate=_mean(float(j.followed) for j in js),
                mean_distance=_mean(j.cluster_distance for j in js),
                mean_content_similarity=_mean(j.content_similarity for j in js),
                mean_aesthetic=_mean(j.aesthetic_score for j in js),
                cell_ids=tuple(c.cell_id for c, _ in items),
            )
        )
    return tuple(out)


def miss_rates(cells: Sequence[GridCell], judgements: Sequence[ImageJudgement]) -> dict[tuple[str, str], float]:
    """m(c, s) for every (content id, style id) with at least one judged image."""
    misses: dict[tuple[str, str], list[float]] = defaultdict(list)
    for cell, judged in _pairs(cells, judgements):
        misses[(cell.content_id, cell.style.style_id)].append(0.0 if judged.followed else 1.0)
    return {key: fmean(v) for key, v in misses.items()}


def content_locking(
    contents: Sequence[ContentPrompt],
    cells: Sequence[GridCell],
    judgements: Sequence[ImageJudgement],
    lock_threshold: float = DEFAULT_LOCK_THRESHOLD,
) -> tuple[ContentLocking, ...]:
    """L(c) for each content with judged images (module docstring)."""
    m = miss_rates(cells, judgements)
    per_style: dict[str, list[float]] = defaultdict(list)
    for (_, style_id), rate in m.items():
        per_style[style_id].append(rate)
    m_s = {s: fmean(v) for s, v in per_style.items()}
    counts = Counter(c.content_id for c, _ in _pairs(cells, judgements))
    out = []
    for content in contents:
        styles = sorted(s for (c, s) in m if c == content.content_id)
        if not styles:
            continue
        excess = {s: m[(content.content_id, s)] - m_s[s] for s in styles}
        index = fmean(excess.values())
        worst = max(styles, key=lambda s: (excess[s], s))
        out.append(
            ContentLocking(
                content_id=content.content_id,
                content_text=content.text,
                n=counts[content.content_id],
                miss_rate=fmean(m[(content.content_id, s)] for s in styles),
                expected_miss_rate=fmean(m_s[s] for s in styles),
                locking_index=index,
                locked=index > lock_threshold,
                worst_style_id=worst if excess[worst] > 0 else "",
            )
        )
    return tuple(out)


def style_follow_rates(
    styles: Sequence[StyleRequest], cells: Sequence[GridCell], judgements: Sequence[ImageJudgement]
) -> tuple[StyleFollowRate, ...]:
    """1 - m(s) per style (mean over contents, so every content weighs the same)."""
    m = miss_rates(cells, judgements)
    distances: dict[str, list[float]] = defaultdict(list)
    counts: Counter[str] = Counter()
    for cell, judged in _pairs(cells, judgements):
        distances[cell.style.style_id].append(judged.cluster_distance)
        counts[cell.style.style_id] += 1
    out = []
    for style in styles:
        rates = [r for (_, s), r in m.items() if s == style.style_id]
        if not rates:
            continue
        out.append(
            StyleFollowRate(
                style_id=style.style_id,
                kind=style.kind,
                value=style.value,
                n=counts[style.style_id],
                follow_rate=1.0 - fmean(rates),
                mean_distance=_mean(distances[style.style_id]),
            )
        )
    return tuple(out)


def score_tag_effects(
    contents: Sequence[ContentPrompt], cells: Sequence[GridCell], judgements: Sequence[ImageJudgement]
) -> tuple[ScoreTagEffect, ...]:
    """The whole grid's effect (content_id ""), then each content's, over (content, style, seed) pairs."""
    halves: dict[tuple[str, str, int], dict[bool, float]] = defaultdict(dict)
    for cell, judged in _pairs(cells, judgements):
        halves[(cell.content_id, cell.style.style_id, cell.seed)][cell.score_tags] = judged.aesthetic_score
    pairs = [(key[0], h[True], h[False]) for key, h in halves.items() if True in h and False in h]

    def effect(content_id: str, chosen: list[tuple[str, float, float]]) -> ScoreTagEffect:
        with_ = _mean(p[1] for p in chosen)
        without = _mean(p[2] for p in chosen)
        return ScoreTagEffect(
            content_id=content_id,
            n_pairs=len(chosen),
            mean_with=with_,
            mean_without=without,
            delta=with_ - without,
            win_rate=_mean(float(p[1] > p[2]) for p in chosen),
        )

    out = [effect("", pairs)]
    for content in contents:
        chosen = [p for p in pairs if p[0] == content.content_id]
        if chosen:
            out.append(effect(content.content_id, chosen))
    return tuple(out)


def summarize(
    model: str,
    version: int | None,
    adapters: Sequence[Adapter],
    judgements: Sequence[ImageJudgement],
    locking: Sequence[ContentLocking],
    styles: Sequence[StyleFollowRate],
    effects: Sequence[ScoreTagEffect],
) -> VersionSummary:
    return VersionSummary(
        model=model,
        version=version,
        adapters=tuple(adapters),
        n_images=len(judgements),
        follow_rate=_mean(s.follow_rate for s in styles),
        locking=_mean(max(x.locking_index, 0.0) for x in locking),
        max_locking=max((x.locking_index for x in locking), default=0.0),
        locked_contents=tuple(x.content_id for x in locking if x.locked),
        mean_content_similarity=_mean(j.content_similarity for j in judgements),
        score_tag_delta=effects[0].delta if effects else 0.0,
    )


def _label(summary: VersionSummary) -> str:
    version = "?" if summary.version is None else str(summary.version)
    adapters = "".join(f"+{a.name}:{a.weight:g}" for a in summary.adapters)
    return f"{summary.model} v{version}{adapters}"


def compare(base: Report, candidate: Report, threshold: float) -> Comparison:
    """Candidate vs base; a regression is a rise of more than `threshold` in summary locking or in a content's
    locking index, or a fall of more than `threshold` in the follow rate (module docstring)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    b, c = base.summary, candidate.summary
    regressions: list[Regression] = []
    who = f"{_label(c)} vs {_label(b)}"
    locking_delta = c.locking - b.locking
    if locking_delta > threshold:
        regressions.append(
            Regression(
                "summary",
                "locking",
                "locking",
                b.locking,
                c.locking,
                locking_delta,
                f"{who}: locking rose {b.locking:.3f} -> {c.locking:.3f} (+{locking_delta:.3f} > {threshold:g})",
            )
        )
    follow_delta = c.follow_rate - b.follow_rate
    if -follow_delta > threshold:
        regressions.append(
            Regression(
                "summary",
                "follow_rate",
                "follow_rate",
                b.follow_rate,
                c.follow_rate,
                follow_delta,
                f"{who}: style follow rate fell {b.follow_rate:.3f} -> {c.follow_rate:.3f} "
                f"({follow_delta:.3f} < -{threshold:g})",
            )
        )
    base_l = {x.content_id: max(x.locking_index, 0.0) for x in base.locking}
    content_deltas = {}
    for x in candidate.locking:
        if x.content_id not in base_l:
            continue
        delta = max(x.locking_index, 0.0) - base_l[x.content_id]
        content_deltas[x.content_id] = delta
        if delta > threshold:
            regressions.append(
                Regression(
                    "content",
                    x.content_id,
                    "locking_index",
                    base_l[x.content_id],
                    x.locking_index,
                    delta,
                    f"{who}: content {x.content_id!r} locks more: locking index {base_l[x.content_id]:.3f} -> "
                    f"{x.locking_index:.3f} (+{delta:.3f} > {threshold:g})",
                )
            )
    base_s = {s.style_id: s.follow_rate for s in base.style_rates}
    style_deltas = {
        s.style_id: s.follow_rate - base_s[s.style_id] for s in candidate.style_rates if s.style_id in base_s
    }
    return Comparison(
        base=b,
        candidate=c,
        threshold=threshold,
        locking_delta=locking_delta,
        follow_rate_delta=follow_delta,
        content_deltas=content_deltas,
        style_deltas=style_deltas,
        regressions=tuple(regressions),
    )
