"""What the sampler works with: a generation as asked, as validated (the spec), and its progress and results."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.sampler.families import KINDS, PONY_V7
from services.sampler.lora import AdapterSpec
from services.sampler.prompts import PromptTags


@dataclass(frozen=True)
class AdapterRequest:
    """A LoRA adapter as a request names it: version 0 = the newest; weight None = 1.0."""

    name: str
    version: int = 0
    weight: float | None = None


@dataclass(frozen=True)
class GenerationInput:
    """A request as the caller gave it; None/0 means "the configured default"."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 0
    tags: PromptTags = field(default_factory=PromptTags)
    raw_prompt: bool = False
    preview: bool = False
    model: str = ""  # the family; empty = the default
    model_version: int = 0  # 0 = the version serving now
    adapters: tuple[AdapterRequest, ...] = ()  # LoRA adapters for this request only


@dataclass(frozen=True)
class GenerationSpec:
    """A validated generation: exactly what the model runs (image i uses seed + i)."""

    prompt: str
    user_prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    tags: PromptTags = field(default_factory=PromptTags)
    raw_prompt: bool = False
    preview: bool = False
    # The family (the Triton model it goes to) and the version the request pinned (0 = the one serving).
    model: str = PONY_V7
    model_version: int = 0
    # LoRA adapters resolved from the registry (services/sampler/adapters.py): what Triton loads, in order.
    adapters: tuple[AdapterSpec, ...] = ()

    def parameters(self, seed: int, model_version: str, model_hash: str = "") -> dict[str, object]:
        """The parameters one image carries in its PNG (`model_hash`: A1111's short hash of the weights)."""
        extra: dict[str, object] = {"model_hash": model_hash} if model_hash else {}
        if self.adapters:
            extra["adapters"] = [
                {"name": a.name, "version": a.version, "weight": a.weight, "hash": a.lora_hash} for a in self.adapters
            ]
        return {
            **extra,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "user_prompt": self.user_prompt,
            "steps": self.steps,
            "sampler": KINDS[self.model].sampler_name,
            "guidance": self.guidance,
            "seed": seed,
            "width": self.width,
            "height": self.height,
            "model": self.model,
            "model_version": model_version,
            "raw_prompt": self.raw_prompt,
            "tags": {
                "score": self.tags.score,
                "style_clusters": list(self.tags.style_clusters),
                "source": self.tags.source,
                "rating": self.tags.rating,
                "palette": list(self.tags.palette),
            },
        }


@dataclass
class Progress:
    """Step `step` (1-based) of `total` is done; `previews` are [h, w, 3] uint8, one per image, when asked."""

    step: int
    total: int
    previews: list[np.ndarray] = field(default_factory=list)


@dataclass
class Generated:
    """The model's images ([H, W, 3] uint8), their seeds, and which version and batch produced them."""

    images: list[np.ndarray]
    seeds: list[int]
    model_version: str
    batch_size: int
    compute_s: float = 0.0  # the model's time on this request's batch
    elapsed_s: float = 0.0  # send to final response, as the sampler saw it


@dataclass
class OutputImage:
    """A PNG that passed the safety check (or was not checked)."""

    png: bytes
    seed: int
    image_id: str
    width: int
    height: int
    rating: str = ""


@dataclass
class BlockedOutput:
    """An image the safety check blocked: only why, never the pixels."""

    seed: int
    reasons: list[tuple[str, str]]


@dataclass
class GenerationResult:
    spec: GenerationSpec
    images: list[OutputImage]
    blocked: list[BlockedOutput]
    model_version: str
    batch_size: int
    safety_checked: bool
    safety_note: str = ""
    model_hash: str = ""  # A1111's short hash of the weights (the PNGs' `Model hash`)
