"""Score-tag conventions: buckets, score_N and the V6 tags true of an image."""

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


def test_v6_tags_are_true_of_the_image_never_above_its_bucket() -> None:
    assert cumulative_score_tags(9) == ["score_9", "score_8_up", "score_7_up", "score_6_up", "score_5_up", "score_4_up"]
    assert cumulative_score_tags(8) == ["score_8", "score_8_up", "score_7_up", "score_6_up", "score_5_up", "score_4_up"]
    assert cumulative_score_prompt(7) == "score_7, score_7_up, score_6_up, score_5_up, score_4_up"
    assert cumulative_score_tags(4) == ["score_4", "score_4_up"]
    assert cumulative_score_tags(3) == ["score_3"] and cumulative_score_tags(0) == ["score_0"]
    assert cumulative_tags_for_score(0.42) == "score_4, score_4_up"
    for bucket in range(10):
        assert all(parse_score_tag(t) <= bucket for t in cumulative_score_tags(bucket))


@pytest.mark.parametrize("bucket", [-1, 10])
def test_cumulative_tags_reject_buckets_outside_0_to_9(bucket: int) -> None:
    with pytest.raises(ValueError, match=r"0\.\.9"):
        cumulative_score_tags(bucket)


def test_parse_score_tag_reads_plain_and_up_tags() -> None:
    assert parse_score_tag("score_7") == 7
    assert parse_score_tag("score_4_up") == 4
    assert parse_score_tag("score_10") is None
    assert parse_score_tag("rating_safe") is None
