"""The V7 prompt convention, written once: special tags (score, style, source, rating), factual description,
style description, extra content tags, in that order. The export, the trainer and the sampler all join their
prompts with `join_v7` and order the special tags with `special_tags`; what each normalises before that is its own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Content family -> source tag (DESIGN: source_pony|furry|cartoon|anime|...); `other` has none.
SOURCE_TAGS = {
    "pony": "source_pony",
    "furry": "source_furry",
    "western": "source_cartoon",
    "anime": "source_anime",
    "realism": "source_realism",
}
RATINGS = ("safe", "questionable", "explicit")


def source_tag(category: str | None) -> str | None:
    """`source_<family>` for a content family, None for `other` or an unknown one."""
    return SOURCE_TAGS.get((category or "").lower())


def rating_tag(rating: str | None) -> str | None:
    """`rating_safe|questionable|explicit`, None for anything else."""
    value = (rating or "").lower().removeprefix("rating_")
    return f"rating_{value}" if value in RATINGS else None


def special_tags(
    score_tags: str | Sequence[str] | None = None,
    style_tag: str | Sequence[str] | None = None,
    source: str | None = None,
    rating: str | None = None,
    *,
    unique: bool = True,
) -> list[str]:
    """The special tags in V7 order: score tag(s), style cluster tag(s), source tag, rating tag (empty ones left
    out; with `unique`, a repeated tag only once).

    `score_tags` is one tag (`score_8`) or several (a comma-separated or listed V6 cumulative set)."""
    if isinstance(score_tags, str):
        score_tags = [t.strip() for t in score_tags.split(",")]
    styles = [style_tag] if isinstance(style_tag, str) else list(style_tag or ())
    out = [t for t in (*(score_tags or ()), *styles, source, rating) if t]
    return list(dict.fromkeys(out)) if unique else out


def join_v7(special: Iterable[str], descriptions: Iterable[str | None], extra: Iterable[str] = ()) -> str:
    """`special tags, descriptions (factual, then stylistic), extra tags` joined with ", ", empty parts dropped."""
    return ", ".join(p for p in (*special, *descriptions, *extra) if p)


def _sentence(text: str | None) -> str:
    return " ".join((text or "").split())


def assemble_prompt(
    special: Iterable[str] = (),
    factual: str | None = None,
    style: str | None = None,
    extra_tags: Iterable[str] = (),
) -> str:
    """`special tags, factual description, style description, extra tags` joined with ", " (empty parts dropped;
    an extra tag already among the special tags is not repeated)."""
    special = [t for t in special if t]
    seen = set(special)
    extra = [t for t in dict.fromkeys(t.strip() for t in extra_tags) if t and t not in seen]
    return join_v7(special, [_sentence(factual), _sentence(style)], extra)
