"""Caption kinds and their prompt templates: one per kind, filled with the item's tags and character names and
guided by curated example captions (few-shot). The template version recorded in provenance hashes both."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pony_common.tags import parse_score_tag

DEFAULT_FEWSHOT = Path(__file__).with_name("data") / "fewshot.json"
TEMPLATE_VERSION = "captions-1"
MAX_PROMPT_TAGS = 48
# Booru meta tags that say nothing a picture shows; kept out of prompts.
_META_PREFIXES = ("rating_", "rating:", "source_", "style_cluster_", "meta:")
ARTIST_TAG_PREFIX = "artist:"


@dataclass(frozen=True)
class KindSpec:
    """One caption kind: its instruction, token budget, character limit, and whether it describes content."""

    name: str
    instruction: str
    max_new_tokens: int
    max_chars: int
    one_sentence: bool = False
    content: bool = True


KIND_SPECS: dict[str, KindSpec] = {
    "short": KindSpec(
        "short",
        "Describe this picture in exactly one sentence: the main subject and what it is doing.",
        max_new_tokens=48,
        max_chars=300,
        one_sentence=True,
    ),
    "medium": KindSpec(
        "medium",
        "Describe this picture in two to four sentences: the subjects, their appearance and actions, and the setting.",
        max_new_tokens=128,
        max_chars=1200,
    ),
    "long": KindSpec(
        "long",
        "Describe this picture densely and completely: every visible subject, their appearance, clothing, pose and "
        "expression, every object, the background, the composition and the colours. Leave nothing visible out.",
        max_new_tokens=320,
        max_chars=4000,
    ),
    "style": KindSpec(
        "style",
        "Describe only the artistic style of this picture: the medium, the technique, the colour palette, the "
        "linework and the lighting. Say nothing about who or what is shown.",
        max_new_tokens=128,
        max_chars=1000,
        content=False,
    ),
}
KINDS: tuple[str, ...] = tuple(KIND_SPECS)


def display_tag(tag: str) -> str:
    """A booru tag as words: underscores become spaces."""
    return " ".join(tag.replace("_", " ").split())


def is_meta_tag(tag: str) -> bool:
    """Score, rating, source, cluster and meta tags: facts about the file, not the picture."""
    low = tag.strip().lower()
    return parse_score_tag(low) is not None or low.startswith(_META_PREFIXES)


def split_artist_tags(tags: Sequence[str]) -> tuple[list[str], list[str]]:
    """(tags without `artist:<name>` tags, the names those tags carried)."""
    kept, artists = [], []
    for tag in tags:
        if tag.strip().lower().startswith(ARTIST_TAG_PREFIX):
            name = tag.strip()[len(ARTIST_TAG_PREFIX) :].strip()
            if name:
                artists.append(name)
        else:
            kept.append(tag)
    return kept, artists


def _join(names: Sequence[str]) -> str:
    return ", ".join(names)


class PromptBook:
    """The prompt of each kind, with up to `per_prompt` curated examples of that kind appended."""

    def __init__(self, examples: Mapping[str, Sequence[str]], per_prompt: int = 2) -> None:
        unknown = sorted(set(examples) - set(KINDS))
        if unknown:
            raise ValueError(f"few-shot examples for unknown caption kinds {unknown}; kinds are {list(KINDS)}")
        self.examples = {kind: [" ".join(e.split()) for e in examples.get(kind, ()) if e.strip()] for kind in KINDS}
        self.per_prompt = max(0, int(per_prompt))
        payload = json.dumps(
            {
                "templates": {k: [s.instruction, s.max_new_tokens, s.one_sentence] for k, s in KIND_SPECS.items()},
                "examples": {k: v[: self.per_prompt] for k, v in self.examples.items()},
            },
            sort_keys=True,
        )
        self.version = f"{TEMPLATE_VERSION}+{hashlib.sha256(payload.encode()).hexdigest()[:8]}"

    @classmethod
    def load(cls, path: str | Path | None = None, per_prompt: int = 2) -> PromptBook:
        """Reads a JSON object {kind: [example caption, ...]} (default: the shipped `data/fewshot.json`)."""
        path = Path(path) if path else DEFAULT_FEWSHOT
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read few-shot examples {path}: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(e, str) for e in v) for v in data.values()
        ):
            raise ValueError(f"{path}: expected a JSON object of kind -> list of caption strings")
        return cls(data, per_prompt)

    def prompt(self, kind: str, tags: Sequence[str] = (), characters: Sequence[str] = ()) -> str:
        """The instruction for `kind`, filled with the (display) tags and character names."""
        spec = KIND_SPECS[kind]
        lines = [spec.instruction]
        shown = [display_tag(t) for t in tags if t.strip() and not is_meta_tag(t)]
        shown = list(dict.fromkeys(t for t in shown if t))[:MAX_PROMPT_TAGS]
        if spec.content and characters:
            lines.append(f"Characters: {_join(characters)}. Call each of them by name.")
        if shown:
            hint = "hints; describe only what you see" if spec.content else "hints for the style only"
            lines.append(f"Tags ({hint}): {_join(shown)}.")
        examples = self.examples[kind][: self.per_prompt]
        if examples:
            lines.append("Write like these examples:")
            lines += [f"- {e}" for e in examples]
        lines.append('Begin directly with the description, never with "The image" or "This image".')
        return "\n".join(lines)
