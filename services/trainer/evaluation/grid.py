"""The style-adherence grid: content prompts x style requests x score tags on/off x seeds, built deterministically
(the same arguments give the same cells, in the same order, with the same seeds)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pony_common.errors import InvalidArgument
from services.trainer.evaluation.results import ContentPrompt, GridCell, StyleRequest

# Content prompts that lock a style are what the report is for: each kind the issue names, a few of each.
DEFAULT_CONTENTS: tuple[ContentPrompt, ...] = (
    ContentPrompt("portrait", "portrait of a young woman, head and shoulders, looking at the viewer", "portrait"),
    ContentPrompt("full_body", "full body shot of a knight in armour standing in a field", "full_body"),
    ContentPrompt("close_up", "close-up of a cat's face with green eyes", "close_up"),
    ContentPrompt("landscape", "a mountain landscape with a lake at sunset", "landscape"),
    ContentPrompt("object", "a red teapot on a wooden table", "object"),
    ContentPrompt("character_pony", "twilight sparkle, a purple unicorn pony, smiling", "character"),
    ContentPrompt("character_anime", "hatsune miku with long teal twintails, singing", "character"),
    ContentPrompt("scene", "a busy city street at night in the rain, neon signs", "scene"),
)
# pony_common.prompts' sources (the sampler's PromptTags.source vocabulary), each a look of its own.
DEFAULT_SOURCES: tuple[str, ...] = ("anime", "cartoon", "furry", "realism")
DEFAULT_WORDS: tuple[str, ...] = ("watercolor painting", "pixel art", "oil painting", "pencil sketch")
DEFAULT_SEEDS = 2
DEFAULT_BASE_SEED = 1000
DEFAULT_CLUSTERS = 4
SCORE_TAG_LEVEL = 7  # with score tags: the V6/V7 "score_9, score_8_up, score_7_up" request (PromptTags.score = 7)
MAX_CELLS = 20_000

_ID_RE = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    return _ID_RE.sub("_", text.lower()).strip("_")[:48] or "x"


def cluster_style(cluster_id: int, tag: str, family: str = "") -> StyleRequest:
    return StyleRequest(f"cluster_{cluster_id}", "cluster", tag, (tag,), cluster_id, family)


def source_style(source: str) -> StyleRequest:
    return StyleRequest(f"source_{source}", "source", source, (f"source_{source}",))


def word_style(word: str) -> StyleRequest:
    return StyleRequest(f"word_{slug(word)}", "word", word, (word,))


@dataclass(frozen=True)
class GridSpec:
    """What to generate. `clusters`: (cluster id, tag[, family]) of the style tagger's current set to request."""

    contents: tuple[ContentPrompt, ...] = DEFAULT_CONTENTS
    clusters: tuple[tuple[int, str] | tuple[int, str, str], ...] = ()
    sources: tuple[str, ...] = DEFAULT_SOURCES
    words: tuple[str, ...] = DEFAULT_WORDS
    seeds: int = DEFAULT_SEEDS
    base_seed: int = DEFAULT_BASE_SEED
    score_tags: tuple[bool, ...] = (False, True)

    def styles(self) -> tuple[StyleRequest, ...]:
        return (
            *(cluster_style(*c) for c in self.clusters),
            *(source_style(s) for s in self.sources),
            *(word_style(w) for w in self.words),
        )

    def check(self) -> None:
        if not self.contents:
            raise InvalidArgument("contents", "the grid needs at least one content prompt")
        if len({c.content_id for c in self.contents}) != len(self.contents):
            raise InvalidArgument("contents", "content ids must be unique")
        if not self.styles():
            raise InvalidArgument("styles", "the grid needs at least one style request")
        if not 1 <= self.seeds <= 64:
            raise InvalidArgument("seeds", f"must be 1..64, got {self.seeds}")
        if not 0 <= self.base_seed < 2**62:
            raise InvalidArgument("base_seed", "must be 0..2^62")
        if not self.score_tags or len(set(self.score_tags)) != len(self.score_tags):
            raise InvalidArgument("score_tags", "give on and/or off, once each")
        if self.size > MAX_CELLS:
            raise InvalidArgument("seeds", f"the grid would have {self.size} images (at most {MAX_CELLS})")

    @property
    def size(self) -> int:
        return len(self.contents) * len(self.styles()) * len(self.score_tags) * self.seeds

    def to_dict(self) -> dict:
        return {
            "contents": [c.content_id for c in self.contents],
            "styles": [s.style_id for s in self.styles()],
            "seeds": self.seeds,
            "base_seed": self.base_seed,
            "score_tags": list(self.score_tags),
            "images": self.size,
        }


def prompt_text(content: ContentPrompt, style: StyleRequest) -> str:
    """The prompt's text part (V7 order: factual description, then stylistic description); special tags (score,
    style cluster, source, rating) go in PromptTags and the sampler puts them in front."""
    if style.kind == "word":
        return f"{content.text}, {style.value}"
    return content.text


def build_grid(spec: GridSpec) -> tuple[GridCell, ...]:
    """Every cell of the grid, content-major. The seeds are `base_seed + k` for every cell, so that cells differ
    only by what they ask for (score tags on/off pairs share content, style and seed)."""
    spec.check()
    cells = []
    for content in spec.contents:
        for style in spec.styles():
            for score_tags in spec.score_tags:
                for k in range(spec.seeds):
                    seed = spec.base_seed + k
                    tag = "st" if score_tags else "nost"
                    cells.append(
                        GridCell(
                            cell_id=f"{content.content_id}|{style.style_id}|{tag}|{seed}",
                            content_id=content.content_id,
                            content_text=content.text,
                            style=style,
                            score_tags=score_tags,
                            seed=seed,
                            prompt=prompt_text(content, style),
                        )
                    )
    return tuple(cells)


def pick_clusters(available: Sequence[tuple], count: int) -> tuple[tuple, ...]:
    """`count` clusters ((id, tag[, family]) tuples) of the style tagger's set, spread over its ids
    (deterministic: the same set gives the same pick); 0 = none, more than there are = all."""
    ordered = sorted(set(available))
    if count <= 0 or not ordered:
        return ()
    if count >= len(ordered):
        return tuple(ordered)
    step = len(ordered) / count
    return tuple(ordered[int(i * step)] for i in range(count))
