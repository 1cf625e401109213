"""The model families the sampler serves, one Triton model each (named as the family): `pony_v7` (Pony V7, a
diffusers AuraFlowPipeline) and `pony_v6` (Pony V6, a StableDiffusionXLPipeline). A family names its pipeline
class, its prompt convention (pony_common.prompts), where its weights are, its request defaults and limits, and
the token budget of its tokenizer. The served families and the default one come from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.prompts import V6, V7, PromptConvention

PONY_V7 = "pony_v7"
PONY_V6 = "pony_v6"


@dataclass(frozen=True)
class FamilyKind:
    """What a family is, whatever the settings: its pipeline, prompt convention and where its tiny model is."""

    name: str
    pipeline: str  # the diffusers pipeline class
    convention: PromptConvention
    models_subdir: str  # `ponyctl models tiny DIR` writes it as DIR/<models_subdir>
    sampler_name: str  # the sampler as the PNG parameters name it
    description: str


KINDS: dict[str, FamilyKind] = {
    PONY_V7: FamilyKind(PONY_V7, "AuraFlowPipeline", V7, "auraflow", "Euler (flow matching)", "Pony V7 (AuraFlow)"),
    PONY_V6: FamilyKind(PONY_V6, "StableDiffusionXLPipeline", V6, "sdxl", "Euler", "Pony V6 (SDXL)"),
}


@dataclass(frozen=True)
class Limits:
    """A family's request defaults and limits."""

    width: int
    height: int
    steps: int
    guidance: float
    negative_prompt: str
    max_width: int
    max_height: int
    max_steps: int
    max_guidance: float
    max_images: int
    max_prompt_tokens: int


@dataclass(frozen=True)
class Family:
    """A served family: its kind, its defaults and limits, and the weights of its first version."""

    kind: FamilyKind
    limits: Limits
    model_path: str
    is_default: bool = False

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def pipeline(self) -> str:
        return self.kind.pipeline

    @property
    def convention(self) -> PromptConvention:
        return self.kind.convention

    @property
    def max_tokens(self) -> int:
        return self.limits.max_prompt_tokens


def model_path(settings: Settings, name: str) -> str:
    """The pipeline a family's first version serves: PONY_SAMPLER_MODEL (V7) / PONY_SAMPLER_V6_MODEL (V6), else its
    tiny folder in models_dir."""
    if name == PONY_V7:
        return settings.model_path("sampler")
    kind = kind_of(name)
    return settings.sampler.v6_model or str(Path(settings.models_dir) / kind.models_subdir)


def kind_of(name: str) -> FamilyKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(KINDS)}") from None


def limits(settings: Settings, name: str) -> Limits:
    s = settings.sampler
    shared = {
        "max_width": s.max_width,
        "max_height": s.max_height,
        "max_steps": s.max_steps,
        "max_guidance": s.max_guidance,
        "max_images": s.max_images,
        "max_prompt_tokens": kind_of(name).convention.max_tokens,
    }
    if name == PONY_V6:
        return Limits(
            s.v6_default_width, s.v6_default_height, s.v6_default_steps, s.v6_default_guidance, s.v6_negative_prompt,
            **shared,
        )  # fmt: skip
    return Limits(s.default_width, s.default_height, s.default_steps, s.default_guidance, s.negative_prompt, **shared)


def served(settings: Settings) -> dict[str, Family]:
    """The families PONY_SAMPLER_FAMILIES names, in that order; ValueError for an unknown one or a default
    (PONY_SAMPLER_DEFAULT_MODEL) that is not served."""
    names = list(dict.fromkeys(n.strip() for n in settings.sampler.families if n.strip()))
    if not names:
        raise ValueError(f"PONY_SAMPLER_FAMILIES names no family; known: {', '.join(KINDS)}")
    for name in names:
        kind_of(name)
    default = settings.sampler.default_model.strip() or names[0]
    if default not in names:
        raise ValueError(f"PONY_SAMPLER_DEFAULT_MODEL {default!r} is not served (PONY_SAMPLER_FAMILIES: {names})")
    return {
        name: Family(KINDS[name], limits(settings, name), model_path(settings, name), is_default=name == default)
        for name in names
    }


def default_family(families: dict[str, Family]) -> Family:
    return next(f for f in families.values() if f.is_default)


def resolve(families: dict[str, Family], name: str, field: str = "model") -> Family:
    """The family a request names (empty = the default), or InvalidArgument(field) naming the served ones."""
    name = name.strip()
    if not name:
        return default_family(families)
    family = families.get(name)
    if family is None:
        known = "unknown model family" if name not in KINDS else "model family not served here"
        raise InvalidArgument(field, f"{known} {name[:64]!r}; served: {', '.join(families)}")
    return family
