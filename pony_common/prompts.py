"""V7 prompt assembly shared by the export and the sampler: special tags, factual description, style
description, extra content tags, in that order."""

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
    style_tag: str | None = None,
    source: str | None = None,
    rating: str | None = None,
) -> list[str]:
    """The special tags in V7 order: score tag(s), style cluster tag, source tag, rating tag (empty ones left out).

    `score_tags` is one tag (`score_8`) or several (a comma-separated or listed V6 cumulative set)."""
    if isinstance(score_tags, str):
        score_tags = [t.strip() for t in score_tags.split(",")]
    out = [t for t in (*(score_tags or ()), style_tag, source, rating) if t]
    return list(dict.fromkeys(out))


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
    parts = [*special, _sentence(factual), _sentence(style), *extra]
    return ", ".join(p for p in parts if p)
