"""Tag rules: the blocked-tag list and the tags that set a rating (`rating_explicit`, explicit and suggestive tags).

Tags compare by their `pony_common.textnorm` keys (NFKC, case folded, invisible characters removed, confusables
folded to Latin, `_`/space/`-` as one), so `ｌｏｌｉ`, `lo\u200bli` and Cyrillic `lоlі` are the rule `loli`.
Blocked tags match an item's tags and the comma-separated pieces (any comma form) of its tags and caption (a prompt
is a tag list), each also with prompt weights and punctuation dropped (`(loli:1.2)`, `#loli`); rating tags also
match whole words anywhere in the caption, since raising a rating on free text only ever errs on the safe side. A
match is reported by the rule's own spelling, never by the caller's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import resources
from pathlib import Path

import yaml

from pony_common.config import ConfigError
from pony_common.textnorm import bare_key, skeleton_table, split_tags, tag_key, words_key

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
    """How a rule's tag is spelled in reasons: `Rating_Explicit ` -> `rating explicit` (comparison uses `tag_key`)."""
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
class _Vocabulary:
    """One list of rule tags indexed by comparison key: tag key -> the rule's spelling, and word keys for text."""

    by_key: dict[str, str]
    words: tuple[tuple[str, str], ...]  # (` word key `, the rule's spelling), sorted by spelling

    @classmethod
    def of(cls, tags: frozenset[str]) -> _Vocabulary:
        ordered = sorted(tags)
        return cls({tag_key(t): t for t in reversed(ordered)}, tuple((f" {words_key(t)} ", t) for t in ordered))


@dataclass(frozen=True)
class TagRules:
    blocked: frozenset[str]
    explicit: frozenset[str]
    questionable: frozenset[str]
    _vocabularies: tuple[_Vocabulary, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        vocabularies = tuple(_Vocabulary.of(v) for v in (self.blocked, self.explicit, self.questionable))
        object.__setattr__(self, "_vocabularies", vocabularies)

    @property
    def version(self) -> str:
        """A short hash of the three lists (for provenance)."""
        data = json.dumps([sorted(self.blocked), sorted(self.explicit), sorted(self.questionable)]).encode()
        return hashlib.sha256(data).hexdigest()[:12]

    def match(self, tags: list[str], caption: str = "") -> TagMatch:
        """The blocked, explicit and questionable rule tags found in `tags` and `caption`, in first-seen order,
        each as the rule spells it. Every comparison is between `pony_common.textnorm` keys."""
        pieces = [key for t in tags for key in split_tags(t)]
        pieces += split_tags(caption)
        pieces = list(dict.fromkeys(pieces + [bare_key(p) for p in pieces]))  # `(loli:1.2)`, `#loli` too
        text = f" {words_key(caption)} " if caption else ""

        def found(vocabulary: _Vocabulary, in_text: bool) -> tuple[str, ...]:
            hits = [vocabulary.by_key[p] for p in pieces if p in vocabulary.by_key]
            if in_text and text.strip():
                hits += [spelled for key, spelled in vocabulary.words if key.strip() and key in text]
            return tuple(dict.fromkeys(hits))

        blocked, explicit, questionable = self._vocabularies
        return TagMatch(
            blocked=found(blocked, in_text=False),
            explicit=found(explicit, in_text=True),
            questionable=found(questionable, in_text=True),
        )


def _read_list(values: object, where: str) -> frozenset[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: must be a list of tags")
    return frozenset(normalize_tag(v) for v in values if normalize_tag(v))


def load_tag_rules(blocked_tags_path: str = "") -> TagRules:
    """The shipped default rules; `blocked_tags_path` (one tag a line, `#` comments) replaces the blocked list."""
    skeleton_table()  # the confusables table is built at load, not on the first request
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
