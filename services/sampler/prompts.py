"""Prompt assembly of a generation request in the V7 order of pony_common.prompts: score tags, style cluster tags,
source tag, rating tag, then the caller's text.

What is the sampler's own: a request names a score (its cumulative tags) and any number of style clusters (kept
as given, repeats included), and its text is sent as written (stripped only), where the export takes one style
tag, drops repeated tags and collapses whitespace."""

from __future__ import annotations

from dataclasses import dataclass

from pony_common.errors import InvalidArgument
from pony_common.prompts import RATINGS, SOURCE_TAGS, join_v7
from pony_common.prompts import special_tags as v7_special_tags
from pony_common.tags import TOP_BUCKET, cumulative_score_tags

# The source a request names is its tag without the prefix: pony, furry, cartoon, anime, realism.
SOURCES = tuple(tag.removeprefix("source_") for tag in SOURCE_TAGS.values())


@dataclass(frozen=True)
class PromptTags:
    """The special tags a caller asks for; empty values add nothing."""

    score: int | None = None
    style_clusters: tuple[int, ...] = ()
    source: str = ""
    rating: str = ""

    def validate(self) -> None:
        if self.score is not None and not 0 <= self.score <= TOP_BUCKET:
            raise InvalidArgument("tags.score", f"must be in 0..{TOP_BUCKET}, got {self.score}")
        for i, cluster in enumerate(self.style_clusters):
            if cluster < 0:
                raise InvalidArgument(f"tags.style_clusters[{i}]", f"must be >= 0, got {cluster}")
        if self.source and self.source not in SOURCES:
            raise InvalidArgument("tags.source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.rating and self.rating not in RATINGS:
            raise InvalidArgument("tags.rating", f"must be one of {', '.join(RATINGS)}, got {self.rating!r}")


def special_tags(tags: PromptTags, style_format: str = "style_cluster_{n}") -> list[str]:
    """The tags in V7 order. A score N asks for quality N or better (`score_9, score_8_up, …, score_N_up`)."""
    return v7_special_tags(
        cumulative_score_tags(tags.score) if tags.score is not None else None,
        [style_format.format(n=n) for n in tags.style_clusters],
        f"source_{tags.source}" if tags.source else None,
        f"rating_{tags.rating}" if tags.rating else None,
        unique=False,
    )


def assemble_prompt(text: str, tags: PromptTags, *, style_format: str = "style_cluster_{n}", raw: bool = False) -> str:
    """`raw` sends the text as written; otherwise the special tags go first, joined with ", "."""
    text = text.strip()
    if raw:
        return text
    return join_v7(special_tags(tags, style_format), [text])
