"""Request validation: defaults from config, limits on size, steps, guidance, images, seed, prompt length and
prompt tokens.

Every violation raises InvalidArgument naming the request field, before any work reaches Triton. The prompt lengths
are checked first, before any text is assembled, normalised or tokenized; tokenizing is CPU work, so the service runs
`spec` in a worker thread, off the event loop."""

from __future__ import annotations

import math
import secrets
from typing import Any

from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.prompts import V7
from services.sampler.generation import GenerationInput, GenerationSpec
from services.sampler.prompts import assemble_prompt

# The pipeline encodes at most this many text tokens (AuraFlow's max_sequence_length, the V7 convention's budget).
PIPELINE_MAX_TOKENS = V7.max_tokens
MAX_SEED = 2**63 - 1
SIZE_MULTIPLE = 16
# Every style tag is at least one token, so more clusters than the pipeline's tokens can never fit a prompt.
MAX_STYLE_CLUSTERS = PIPELINE_MAX_TOKENS


class RequestValidator:
    """Turns a GenerationInput into a GenerationSpec, or raises InvalidArgument(field, reason)."""

    def __init__(self, settings: Settings, tokenizer: Any) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        limit = int(getattr(tokenizer, "model_max_length", PIPELINE_MAX_TOKENS) or PIPELINE_MAX_TOKENS)
        self.token_limit = min(limit, PIPELINE_MAX_TOKENS)

    def count_tokens(self, text: str) -> int:
        """Tokens the pipeline would encode, end-of-sequence token included."""
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def check_lengths(self, given: GenerationInput) -> None:
        """The texts within `max_prompt_chars` and the style clusters within what a prompt can hold: cheap checks
        that bound the work of everything after them (assembly, normalisation, tokenizing)."""
        limit = self.settings.sampler.max_prompt_chars
        for name, text in (("prompt", given.prompt), ("negative_prompt", given.negative_prompt)):
            if len(text) > limit:
                raise InvalidArgument(
                    name, f"is {len(text):,} characters long; the limit is {limit:,} (PONY_SAMPLER_MAX_PROMPT_CHARS)"
                )
        clusters = len(given.tags.style_clusters)
        if clusters > MAX_STYLE_CLUSTERS:
            raise InvalidArgument("tags.style_clusters", f"{clusters} given; at most {MAX_STYLE_CLUSTERS}")

    def spec(self, given: GenerationInput) -> GenerationSpec:
        self.check_lengths(given)
        s = self.settings
        width = given.width or s.sampler.default_width
        height = given.height or s.sampler.default_height
        for name, value, limit in (("width", width, s.sampler.max_width), ("height", height, s.sampler.max_height)):
            if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
                raise InvalidArgument(name, f"must be a multiple of {SIZE_MULTIPLE} (at least 16), got {value}")
            if value > limit:
                raise InvalidArgument(name, f"must be at most {limit}, got {value}")
        steps = given.steps or s.sampler.default_steps
        if not 1 <= steps <= s.sampler.max_steps:
            raise InvalidArgument("steps", f"must be in 1..{s.sampler.max_steps}, got {steps}")
        guidance = s.sampler.default_guidance if given.guidance is None else float(given.guidance)
        if not math.isfinite(guidance) or not 0.0 <= guidance <= s.sampler.max_guidance:
            raise InvalidArgument("guidance", f"must be in 0..{s.sampler.max_guidance:g}, got {guidance:g}")
        num_images = given.num_images or 1
        if not 1 <= num_images <= s.sampler.max_images:
            raise InvalidArgument("num_images", f"must be in 1..{s.sampler.max_images}, got {num_images}")
        seed = secrets.randbelow(2**32) if given.seed is None else int(given.seed)
        if not 0 <= seed <= MAX_SEED - num_images:
            raise InvalidArgument("seed", f"must be in 0..{MAX_SEED - num_images}, got {seed}")
        given.tags.validate()
        prompt = assemble_prompt(given.prompt, given.tags, style_format=s.style_tag_format, raw=given.raw_prompt)
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty (give a prompt or tags)")
        self._check_tokens("prompt", prompt)
        negative = given.negative_prompt.strip() or s.sampler.negative_prompt
        self._check_tokens("negative_prompt", negative)
        return GenerationSpec(
            prompt=prompt,
            user_prompt=given.prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=seed,
            num_images=num_images,
            tags=given.tags,
            raw_prompt=given.raw_prompt,
            preview=given.preview,
        )

    def _check_tokens(self, name: str, text: str) -> None:
        count = self.count_tokens(text)
        if count > self.token_limit:
            what = "with its tags " if name == "prompt" else ""
            raise InvalidArgument(name, f"is {count} tokens {what}long; the limit is {self.token_limit}")
