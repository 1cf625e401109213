"""Score-tag conventions: buckets, score_N and the V6 cumulative tag string."""

from __future__ import annotations

import math

import pytest

from pony_common.tags import (
    cumulative_score_prompt,
    cumulative_score_tags,
    cumulative_tags_for_score,
    parse_score_tag,
    score_bucket,
    score_tag,
)


@pytest.mark.parametrize(
    ("score", "bucket"),
    [(0.0, 0), (0.0999, 0), (0.1, 1), (0.55, 5), (0.8999, 8), (0.9, 9), (0.99, 9), (1.0, 9), (-0.3, 0), (7.5, 9)],
)
def test_bucket_is_floor_of_ten_times_score_clamped(score: float, bucket: int) -> None:
    assert score_bucket(score) == bucket
    assert score_tag(score) == f"score_{bucket}"


def test_nan_score_is_bucket_zero() -> None:
    assert score_bucket(math.nan) == 0


def test_cumulative_tags_run_from_score_9_down_to_the_bucket() -> None:
    assert cumulative_score_tags(9) == ["score_9"]
    assert cumulative_score_tags(8) == ["score_9", "score_8_up"]
    assert cumulative_score_prompt(7) == "score_9, score_8_up, score_7_up"
    assert cumulative_score_tags(0) == ["score_9"] + [f"score_{k}_up" for k in range(8, -1, -1)]
    assert cumulative_tags_for_score(0.42) == "score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up"


@pytest.mark.parametrize("bucket", [-1, 10])
def test_cumulative_tags_reject_buckets_outside_0_to_9(bucket: int) -> None:
    with pytest.raises(ValueError, match=r"0\.\.9"):
        cumulative_score_tags(bucket)


def test_parse_score_tag_reads_plain_and_up_tags() -> None:
    assert parse_score_tag("score_7") == 7
    assert parse_score_tag("score_4_up") == 4
    assert parse_score_tag("score_10") is None
    assert parse_score_tag("rating_safe") is None
