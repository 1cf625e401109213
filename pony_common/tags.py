"""Pony score tags: the `score_N` bucket of an aesthetic score and the V6 tags true of an image.

An aesthetic score s in [0, 1] falls in bucket N = floor(10 * s), clamped to 0..9, and is tagged `score_N`.
The V6 tags of bucket N are pony_common.prompts.v6's: `score_N`, then `score_K_up` for K = min(N, 8) down to 4
(bucket 9 -> "score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up"; bucket 7 -> "score_7,
score_7_up, score_6_up, score_5_up, score_4_up"; bucket 3 -> "score_3"): never a tag above the image's bucket.
"""

from __future__ import annotations

import math
import re

from pony_common.prompts.base import TOP_BUCKET
from pony_common.prompts.v6 import V6

_SCORE_TAG = re.compile(r"^score_(\d)(_up)?$")

__all__ = [
    "TOP_BUCKET",
    "cumulative_score_prompt",
    "cumulative_score_tags",
    "cumulative_tags_for_score",
    "parse_score_tag",
    "score_bucket",
    "score_tag",
]


def score_bucket(score: float) -> int:
    """floor(10 * score) clamped to 0..9 (a NaN score is bucket 0)."""
    if math.isnan(score):
        return 0
    return max(0, min(TOP_BUCKET, math.floor(10.0 * score)))


def score_tag(score: float) -> str:
    """`score_N` for a score in [0, 1]."""
    return f"score_{score_bucket(score)}"


def cumulative_score_tags(bucket: int) -> list[str]:
    """The V6 score tags of an image in `bucket` (ValueError outside 0..9)."""
    return V6.score_tags(bucket)


def cumulative_score_prompt(bucket: int) -> str:
    """`cumulative_score_tags(bucket)` joined with ", "."""
    return ", ".join(cumulative_score_tags(bucket))


def cumulative_tags_for_score(score: float) -> str:
    """The V6 tag string of the bucket `score` falls in."""
    return cumulative_score_prompt(score_bucket(score))


def parse_score_tag(tag: str) -> int | None:
    """The bucket a `score_N` or `score_N_up` tag names, or None if `tag` is not a score tag."""
    match = _SCORE_TAG.match(tag.strip())
    return int(match.group(1)) if match else None
