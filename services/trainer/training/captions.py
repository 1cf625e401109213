"""The training prompt of an image at one step: a sampled caption, special tags first, tags shuffled/dropped, in the
family's prompt convention (pony_common.prompts) and, given a token budget, within the text encoder's tokens."""

from __future__ import annotations

import random

from pony_common.prompts import join_v7
from pony_common.prompts.budget import TokenBudget
from services.trainer.spec import CaptionSpec
from services.trainer.training.manifest import ManifestItem


def training_prompt(
    item: ManifestItem, spec: CaptionSpec, rng: random.Random, budget: TokenBudget | None = None
) -> str:
    """Special tags (score/style/source/rating/palette, as the export wrote them: never dropped unless
    `keep_special_tags` is off), one caption, then extra content tags.

    With `spec.prompt_probability` the manifest's assembled prompt is used as written (the export fitted it to the
    family's token budget); with `spec.empty_probability` the prompt is empty (the unconditional branch of
    classifier-free guidance). With `budget`, a prompt over the text encoder's tokens loses extra tags from the end
    first, then caption words, never special tags (pony_common.prompts.budget). With shuffling and dropout off the
    prompt is the export's `special tags, caption, tags` string: what the sampler sends for the same tags.
    """
    draw = rng.random()
    if draw < spec.empty_probability:
        return ""
    if item.prompt and draw < spec.empty_probability + spec.prompt_probability:
        return item.prompt
    kinds = [k for k in spec.kinds if item.captions.get(k)]
    caption = item.captions[rng.choice(kinds)] if kinds else ""
    special = list(item.special_tags)
    tags = [t for t in item.tags if t not in special]
    if spec.shuffle_tags:
        rng.shuffle(tags)
    if spec.tag_dropout > 0:
        tags = [t for t in tags if rng.random() >= spec.tag_dropout]
    if not spec.keep_special_tags:
        if spec.shuffle_tags:
            rng.shuffle(special)
        if spec.tag_dropout > 0:
            special = [t for t in special if rng.random() >= spec.tag_dropout]
    if budget is not None:
        return budget.fit(special, [caption.strip()], tags).text
    return join_v7(special, [caption.strip()], tags)
