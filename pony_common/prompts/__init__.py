"""Prompt conventions, one module per model family, used by the export, training and the sampler alike:
v7.py (Pony V7, AuraFlow) and v6.py (Pony V6, SDXL) over base.py (special-tag vocabulary, order, style tag format,
palette tags); budget.py fits a prompt into the family's text-encoder tokens. Each family module's docstring
states its score-tag form."""

from __future__ import annotations

from pony_common.prompts.base import (
    DEFAULT_STYLE_TAG_FORMAT,
    PALETTE_COLORS,
    PALETTE_PREFIX,
    RATINGS,
    SOURCE_TAGS,
    ImageTags,
    PromptConvention,
    assemble_prompt,
    extra_tags_of,
    family_token,
    join_v7,
    palette_tag,
    palette_tags,
    rating_tag,
    source_tag,
    special_tags,
    style_tag,
)
from pony_common.prompts.v6 import V6
from pony_common.prompts.v7 import V7

CONVENTIONS: dict[str, PromptConvention] = {"v7": V7, "v6": V6}


def convention(family: str) -> PromptConvention:
    """The convention of a model family (`v7` | `v6`); ValueError for another."""
    try:
        return CONVENTIONS[family.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(CONVENTIONS)}") from None


__all__ = [
    "CONVENTIONS",
    "DEFAULT_STYLE_TAG_FORMAT",
    "PALETTE_COLORS",
    "PALETTE_PREFIX",
    "RATINGS",
    "SOURCE_TAGS",
    "V6",
    "V7",
    "ImageTags",
    "PromptConvention",
    "assemble_prompt",
    "convention",
    "extra_tags_of",
    "family_token",
    "join_v7",
    "palette_tag",
    "palette_tags",
    "rating_tag",
    "source_tag",
    "special_tags",
    "style_tag",
]
