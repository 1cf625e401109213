"""The training prompt of an image at one step: a sampled caption, special tags first, tags shuffled/dropped."""

from __future__ import annotations

import random

from pony_common.prompts import join_v7
from services.trainer.spec import CaptionSpec
from services.trainer.training.manifest import ManifestItem


def training_prompt(item: ManifestItem, spec: CaptionSpec, rng: random.Random) -> str:
    """V7 order: special tags (score/style/source/rating, never dropped), one caption, then extra content tags.

    With `spec.prompt_probability` the manifest's assembled prompt is used as written; with
    `spec.empty_probability` the prompt is empty (the unconditional branch of classifier-free guidance).
    The order is pony_common.prompts' `join_v7`; unlike the export's `assemble_prompt`, the manifest's text is
    trained as written (no whitespace collapsing, no tag de-duplication).
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
    return join_v7(special, [caption.strip()], tags)
