"""The Pony V6 (SDXL) prompt convention: `score_N` plus the cumulative "at least" tags Pony V6 was trained with,
text encoded by CLIP (77 tokens a chunk, start and end tokens included; diffusers encodes one chunk).

Pony V6 learned `score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up` as "at least" tags: an
image carries `score_K_up` for every K its score reaches, from 8 down to 4 (the top bucket's `score_9` stands for
`score_9_up`; there are no up tags below 4). So an image in bucket N carries `score_N`, then `score_K_up` for
K = min(N, 8) down to 4, never a higher one:
  bucket 9 -> `score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up` (the canonical V6 prompt)
  bucket 7 -> `score_7, score_7_up, score_6_up, score_5_up, score_4_up`
  bucket 3 -> `score_3`
A prompt asking for "score N or better" sends the tags every image of bucket >= N carries: N = 9 -> the canonical
prompt above; 4 <= N <= 8 -> `score_N_up, ..., score_4_up`; N < 4 -> no score tag (no tag is shared by all those
images). Order after the score tags: as base.py."""

from __future__ import annotations

from pony_common.prompts.base import TOP_BUCKET, PromptConvention, check_bucket

CLIP_MAX_LENGTH = 77
UP_FLOOR = 4  # the lowest `score_K_up` tag
UP_CEILING = TOP_BUCKET - 1  # `score_9` is the top; the highest up tag is `score_8_up`


def up_tags(bucket: int) -> list[str]:
    """`score_K_up` for K = min(bucket, 8) down to 4 (empty below 4)."""
    return [f"score_{k}_up" for k in range(min(bucket, UP_CEILING), UP_FLOOR - 1, -1)]


class V6Convention(PromptConvention):
    name = "v6"
    max_tokens = CLIP_MAX_LENGTH

    def score_tags(self, bucket: int) -> list[str]:
        return [f"score_{check_bucket(bucket)}", *up_tags(bucket)]

    def score_query(self, bucket: int) -> list[str]:
        if check_bucket(bucket) == TOP_BUCKET:
            return self.score_tags(TOP_BUCKET)
        return up_tags(bucket)


V6 = V6Convention()
