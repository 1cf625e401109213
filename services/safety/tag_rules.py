"""Tag rules: the blocked-tag list and the tags that set a rating (`rating_explicit`, explicit and suggestive tags).

Tags compare after normalisation (lower case, `_` as space, whitespace collapsed). Blocked tags match an item's
tags and the comma-separated pieces of its caption (a prompt is a tag list); rating tags also match whole words
anywhere in the caption, since raising a rating on free text only ever errs on the safe side.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from pathlib import Path

import yaml

from pony_common.config import ConfigError
from services.safety.codex import text_key

DEFAULT_RULES = "default_tag_rules.yaml"


class Rating(IntEnum):
    """Content rating, ordered; the numbers are those of `pony.v1.Rating`."""

    SAFE = 1
    QUESTIONABLE = 2
    EXPLICIT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def normalize_tag(tag: str) -> str:
    """`Rating_Explicit ` -> `rating explicit`."""
    return " ".join(tag.lower().replace("_", " ").split())


@dataclass(frozen=True)
class TagMatch:
    blocked: tuple[str, ...]
    explicit: tuple[str, ...]
    questionable: tuple[str, ...]

    @property
    def rating(self) -> Rating:
        if self.explicit:
            return Rating.EXPLICIT
        if self.questionable:
            return Rating.QUESTIONABLE
        return Rating.SAFE


@dataclass(frozen=True)
class TagRules:
    blocked: frozenset[str]
    explicit: frozenset[str]
    questionable: frozenset[str]

    @property
    def version(self) -> str:
        """A short hash of the three lists (for provenance)."""
        data = json.dumps([sorted(self.blocked), sorted(self.explicit), sorted(self.questionable)]).encode()
        return hashlib.sha256(data).hexdigest()[:12]

    def match(self, tags: list[str], caption: str = "") -> TagMatch:
        """The blocked, explicit and questionable tags found in `tags` and `caption`, in first-seen order."""
        pieces = [normalize_tag(t) for t in tags]
        pieces += [normalize_tag(p) for p in caption.split(",")]
        pieces = [p for p in dict.fromkeys(pieces) if p]
        text = f" {text_key(caption)} " if caption else ""

        def found(vocabulary: frozenset[str], in_text: bool) -> tuple[str, ...]:
            hits = [p for p in pieces if p in vocabulary]
            if in_text and text:
                hits += sorted(v for v in vocabulary if f" {text_key(v)} " in text)
            return tuple(dict.fromkeys(hits))

        return TagMatch(
            blocked=found(self.blocked, in_text=False),
            explicit=found(self.explicit, in_text=True),
            questionable=found(self.questionable, in_text=True),
        )


def _read_list(values: object, where: str) -> frozenset[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: must be a list of tags")
    return frozenset(normalize_tag(v) for v in values if normalize_tag(v))


def load_tag_rules(blocked_tags_path: str = "") -> TagRules:
    """The shipped default rules; `blocked_tags_path` (one tag a line, `#` comments) replaces the blocked list."""
    text = resources.files("services.safety").joinpath(DEFAULT_RULES).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    blocked = _read_list(data.get("blocked"), f"{DEFAULT_RULES}: blocked")
    explicit = _read_list(data.get("explicit"), f"{DEFAULT_RULES}: explicit") | {"rating explicit"}
    questionable = _read_list(data.get("questionable"), f"{DEFAULT_RULES}: questionable") | {"rating questionable"}
    if blocked_tags_path:
        path = Path(blocked_tags_path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"PONY_SAFETY_BLOCKED_TAGS_PATH={blocked_tags_path}: {exc.strerror or exc}") from None
        blocked = frozenset(normalize_tag(line.split("#", 1)[0]) for line in lines) - {""}
    return TagRules(blocked, explicit, questionable)
