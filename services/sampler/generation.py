"""What the sampler works with: a generation as asked, as validated (the spec), and its progress and results."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.sampler.prompts import PromptTags
from services.sampler.repository import MODEL_NAME


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

    def parameters(self, seed: int, model_version: str) -> dict[str, object]:
        """The parameters one image carries in its PNG."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "user_prompt": self.user_prompt,
            "steps": self.steps,
            "sampler": "Euler (flow matching)",
            "guidance": self.guidance,
            "seed": seed,
            "width": self.width,
            "height": self.height,
            "model": MODEL_NAME,
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
