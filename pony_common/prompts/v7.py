"""The Pony V7 (AuraFlow) prompt convention: one `score_N` per image, text encoded by the AuraFlow pipeline's
tokenizer (UMT5) up to `max_sequence_length` 256 tokens.

Score: an image in bucket N (N = floor(10 * score), 0..9) carries exactly `score_N`. No single tag is shared by
every image of bucket N or better, so a prompt asking for "score N or better" sends the score tags of each bucket
it accepts, best first: N = 8 -> `score_9, score_8`; N = 9 -> `score_9`; N = 6 -> `score_9, score_8, score_7,
score_6`. Every tag sent is one training put on accepted images, and none is on an image below N.
Order: score tag(s), style cluster tag(s), source, rating, palette tags, factual description, style description,
extra content tags (base.py)."""

from __future__ import annotations

from pony_common.prompts.base import TOP_BUCKET, PromptConvention, check_bucket

MAX_SEQUENCE_LENGTH = 256  # AuraFlowPipeline's default max_sequence_length


class V7Convention(PromptConvention):
    name = "v7"
    max_tokens = MAX_SEQUENCE_LENGTH

    def score_tags(self, bucket: int) -> list[str]:
        return [f"score_{check_bucket(bucket)}"]

    def score_query(self, bucket: int) -> list[str]:
        return [f"score_{k}" for k in range(TOP_BUCKET, check_bucket(bucket) - 1, -1)]


V7 = V7Convention()
