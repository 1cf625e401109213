"""Pony score-tag conventions: the `score_N` bucket of an aesthetic score and the V6 cumulative prompt tags.

An aesthetic score s in [0, 1] falls in bucket N = floor(10 * s), clamped to 0..9, and is tagged `score_N`.
The V6 cumulative tags of bucket N read from the top bucket down to N: `score_9` first, then
`score_K_up` for K = 8, 7, ..., N. So bucket 9 -> "score_9"; bucket 7 -> "score_9, score_8_up, score_7_up";
bucket 0 -> "score_9, score_8_up, ..., score_0_up". A prompt asking for quality N or better uses the same string.
"""

from __future__ import annotations

import math
import re

TOP_BUCKET = 9
_SCORE_TAG = re.compile(r"^score_(\d)(_up)?$")


def score_bucket(score: float) -> int:
    """floor(10 * score) clamped to 0..9 (a NaN score is bucket 0)."""
    if math.isnan(score):
        return 0
    return max(0, min(TOP_BUCKET, math.floor(10.0 * score)))


def score_tag(score: float) -> str:
    """`score_N` for a score in [0, 1]."""
    return f"score_{score_bucket(score)}"


def cumulative_score_tags(bucket: int) -> list[str]:
    """The V6 cumulative tags from `score_9` down to `bucket`: ["score_9", "score_8_up", ..., "score_<bucket>_up"]."""
    if not 0 <= bucket <= TOP_BUCKET:
        raise ValueError(f"score bucket must be in 0..{TOP_BUCKET}, got {bucket}")
    return [f"score_{TOP_BUCKET}"] + [f"score_{k}_up" for k in range(TOP_BUCKET - 1, bucket - 1, -1)]


def cumulative_score_prompt(bucket: int) -> str:
    """`cumulative_score_tags(bucket)` joined with ", " (the prompt prefix V6 was trained with)."""
    return ", ".join(cumulative_score_tags(bucket))


def cumulative_tags_for_score(score: float) -> str:
    """The cumulative tag string of the bucket `score` falls in."""
    return cumulative_score_prompt(score_bucket(score))


def parse_score_tag(tag: str) -> int | None:
    """The bucket a `score_N` or `score_N_up` tag names, or None if `tag` is not a score tag."""
    match = _SCORE_TAG.match(tag.strip())
    return int(match.group(1)) if match else None
