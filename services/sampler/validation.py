"""Request validation: the model family (`model`, empty = the default; an unknown or unserved one is
InvalidArgument("model")), then its defaults and limits on size, steps, guidance, images, seed, prompt length and
prompt tokens (the family's tokenizer and budget: V7 256, V6 77), and the prompt assembled in its convention.

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
from services.sampler.families import Family, resolve, served
from services.sampler.generation import GenerationInput, GenerationSpec
from services.sampler.prompts import assemble_prompt

# The most text tokens any family's pipeline encodes (AuraFlow's max_sequence_length, the V7 convention's budget).
PIPELINE_MAX_TOKENS = V7.max_tokens
MAX_SEED = 2**63 - 1
SIZE_MULTIPLE = 16
# Every style tag is at least one token, so more clusters than the pipeline's tokens can never fit a prompt.
MAX_STYLE_CLUSTERS = PIPELINE_MAX_TOKENS


class RequestValidator:
    """Turns a GenerationInput into a GenerationSpec, or raises InvalidArgument(field, reason).

    `tokenizers`: family -> its tokenizer (a single tokenizer is the default family's)."""

    def __init__(self, settings: Settings, tokenizers: dict[str, Any] | Any) -> None:
        self.settings = settings
        self.families: dict[str, Family] = served(settings)
        if not isinstance(tokenizers, dict):
            tokenizers = {resolve(self.families, "").name: tokenizers}
        self.tokenizers = tokenizers
        self.token_limits = {}
        for name, tokenizer in tokenizers.items():
            budget = self.families[name].max_tokens if name in self.families else PIPELINE_MAX_TOKENS
            limit = int(getattr(tokenizer, "model_max_length", budget) or budget)
            self.token_limits[name] = min(limit, budget)

    @property
    def tokenizer(self) -> Any:
        """The default family's tokenizer."""
        return self.tokenizers[resolve(self.families, "").name]

    @property
    def token_limit(self) -> int:
        """The default family's prompt token budget."""
        return self.token_limits[resolve(self.families, "").name]

    def count_tokens(self, text: str, family: str = "") -> int:
        """Tokens the family's pipeline would encode (start and end tokens included)."""
        tokenizer = self.tokenizers[resolve(self.families, family).name]
        return len(tokenizer(text, truncation=False)["input_ids"])

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

    def family(self, given: GenerationInput) -> Family:
        """The family the request names (empty = the default), or InvalidArgument("model")."""
        return resolve(self.families, given.model)

    def spec(self, given: GenerationInput) -> GenerationSpec:
        family = self.family(given)
        self.check_lengths(given)
        s = self.settings
        lim = family.limits
        width = given.width or lim.width
        height = given.height or lim.height
        for name, value, limit in (("width", width, lim.max_width), ("height", height, lim.max_height)):
            if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
                raise InvalidArgument(name, f"must be a multiple of {SIZE_MULTIPLE} (at least 16), got {value}")
            if value > limit:
                raise InvalidArgument(name, f"must be at most {limit}, got {value}")
        steps = given.steps or lim.steps
        if not 1 <= steps <= lim.max_steps:
            raise InvalidArgument("steps", f"must be in 1..{lim.max_steps}, got {steps}")
        guidance = lim.guidance if given.guidance is None else float(given.guidance)
        if not math.isfinite(guidance) or not 0.0 <= guidance <= lim.max_guidance:
            raise InvalidArgument("guidance", f"must be in 0..{lim.max_guidance:g}, got {guidance:g}")
        num_images = given.num_images or 1
        if not 1 <= num_images <= lim.max_images:
            raise InvalidArgument("num_images", f"must be in 1..{lim.max_images}, got {num_images}")
        seed = secrets.randbelow(2**32) if given.seed is None else int(given.seed)
        if not 0 <= seed <= MAX_SEED - num_images:
            raise InvalidArgument("seed", f"must be in 0..{MAX_SEED - num_images}, got {seed}")
        given.tags.validate()
        if given.model_version < 0:
            raise InvalidArgument(
                "model_version", f"must be 0 (the serving version) or a version, got {given.model_version}"
            )
        prompt = assemble_prompt(
            given.prompt,
            given.tags,
            style_format=s.style_tag_format,
            raw=given.raw_prompt,
            convention=family.convention,
        )
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty (give a prompt or tags)")
        self._check_tokens("prompt", prompt, family.name)
        negative = given.negative_prompt.strip() or lim.negative_prompt
        self._check_tokens("negative_prompt", negative, family.name)
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
            model=family.name,
            model_version=given.model_version,
        )

    def _check_tokens(self, name: str, text: str, family: str) -> None:
        count = self.count_tokens(text, family)
        limit = self.token_limits[family]
        if count > limit:
            what = "with its tags " if name == "prompt" else ""
            raise InvalidArgument(name, f"is {count} tokens {what}long; the limit is {limit}")
