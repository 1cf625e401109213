"""Prompt assembly of a generation request in V7 order: score tags, style cluster tags, source tag, rating tag,
then the caller's text.

The vocabulary (source and rating tags) is pony_common.prompts'. The assembly stays the sampler's own, because it
differs from the export's `special_tags`/`assemble_prompt` there: a request names a score (its cumulative tags)
and any number of style clusters (kept as given, repeats included), and its text is sent as written (stripped
only), where the export takes one style tag, drops repeated tags and collapses whitespace."""

from __future__ import annotations

from dataclasses import dataclass

from pony_common.errors import InvalidArgument
from pony_common.prompts import RATINGS, SOURCE_TAGS
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
    out: list[str] = []
    if tags.score is not None:
        out += cumulative_score_tags(tags.score)
    out += [style_format.format(n=n) for n in tags.style_clusters]
    if tags.source:
        out.append(f"source_{tags.source}")
    if tags.rating:
        out.append(f"rating_{tags.rating}")
    return out


def assemble_prompt(text: str, tags: PromptTags, *, style_format: str = "style_cluster_{n}", raw: bool = False) -> str:
    """`raw` sends the text as written; otherwise the special tags go first, joined with ", "."""
    text = text.strip()
    if raw:
        return text
    return ", ".join([*special_tags(tags, style_format), *([text] if text else [])])
