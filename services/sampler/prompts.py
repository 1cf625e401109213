"""Prompt assembly of a generation request in its model family's convention (pony_common.prompts): score tags,
style cluster tags, source tag, rating tag, palette tags, then the caller's text.

A request's score N asks for "score N or better": the family's `score_query` (V7: `score_9, ..., score_N`; V6:
the `_up` tags every image of bucket >= N carries). Style clusters are formatted with the configured style tag
format; a family-prefixed format (`{family}_{n}`) takes the request's `style_family` (the cluster's family, as the
style tagger lists it), else falls back to the global family token the tagger writes for a set not fitted per
family (`style_{n}`): never a guess from the source, since a cluster's family is the set's, not the request's. The
caller's text is sent as written (stripped only); repeated style clusters are kept as given."""

from __future__ import annotations

from dataclasses import dataclass

from pony_common.errors import InvalidArgument
from pony_common.prompts import (
    DEFAULT_STYLE_TAG_FORMAT,
    PALETTE_COLORS,
    RATINGS,
    SOURCE_TAGS,
    V7,
    ImageTags,
    PromptConvention,
    join_v7,
    palette_tag,
    style_tag,
)
from pony_common.prompts.base import TOP_BUCKET

# The source a request names is its tag without the prefix: pony, furry, cartoon, anime, realism.
SOURCES = tuple(tag.removeprefix("source_") for tag in SOURCE_TAGS.values())
FAMILY_MAX = 64


@dataclass(frozen=True)
class PromptTags:
    """The special tags a caller asks for; empty values add nothing."""

    score: int | None = None
    style_clusters: tuple[int, ...] = ()
    source: str = ""
    rating: str = ""
    palette: tuple[str, ...] = ()  # colour names (`sky_blue`) or tags (`palette_sky_blue`)
    style_family: str = ""  # the `{family}` of a family-prefixed style tag format

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
        if len(self.palette) > len(PALETTE_COLORS):
            raise InvalidArgument("tags.palette", f"{len(self.palette)} given; at most {len(PALETTE_COLORS)}")
        for i, colour in enumerate(self.palette):
            try:
                palette_tag(colour)
            except ValueError:
                raise InvalidArgument(
                    f"tags.palette[{i}]", f"unknown colour {colour[:40]!r}; known: {', '.join(PALETTE_COLORS)}"
                ) from None
        if len(self.style_family) > FAMILY_MAX:
            raise InvalidArgument("tags.style_family", f"is longer than {FAMILY_MAX} characters")


def special_tags(
    tags: PromptTags, style_format: str = DEFAULT_STYLE_TAG_FORMAT, convention: PromptConvention = V7
) -> list[str]:
    """The tags in the family's order (repeats kept as asked)."""
    try:
        styles = tuple(style_tag(style_format, n, tags.style_family) for n in tags.style_clusters)
    except ValueError as exc:  # a bad PONY_STYLE_TAG_FORMAT is the server's configuration, not the request
        raise RuntimeError(str(exc)) from None
    asked = ImageTags(
        bucket=tags.score,
        styles=styles,
        source=f"source_{tags.source}" if tags.source else None,
        rating=f"rating_{tags.rating}" if tags.rating else None,
        palette=tuple(palette_tag(c) for c in tags.palette),
    )
    return convention.query_special_tags(asked, unique=False)


def assemble_prompt(
    text: str,
    tags: PromptTags,
    *,
    style_format: str = DEFAULT_STYLE_TAG_FORMAT,
    raw: bool = False,
    convention: PromptConvention = V7,
) -> str:
    """`raw` sends the text as written; otherwise the special tags go first, joined with ", "."""
    text = text.strip()
    if raw:
        return text
    return join_v7(special_tags(tags, style_format, convention), [text])
