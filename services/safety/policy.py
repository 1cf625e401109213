"""The safety policy: rating (the max of classifier and tags) and the allow/block decision with rule ids.

Rules (each reason names its rule id and the codex version):
- `tags.blocked`: a blocked tag -> block, whatever the rating.
- `codex.minor_explicit`: explicit content with a minor-coded character -> block.
- `codex.real_person_explicit`: explicit content with a real person -> block.
- `codex.ambiguous_explicit`: explicit content with an age-ambiguous character -> block by default
  (`PONY_SAFETY_AMBIGUOUS_EXPLICIT=block`): a production platform cannot tell such a character is an adult,
  so it does not publish or train on it explicitly. `flag` keeps the item, flagged for human review.
- Characters the codex does not know are reported (`unknown_characters`, flag `codex.unknown_character`) and
  never guessed; they block nothing by themselves.
Questionable content with a minor-coded, ambiguous or real character is flagged, not blocked.
Tags, captions and names are compared by their `pony_common.textnorm` keys (in `tag_rules.py` and `codex.py`), so
no spelling variant (fullwidth, invisible characters, lookalike letters, case, `_`/`-`/space) slips past a rule;
reasons quote the rule's or the codex's spelling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.safety.codex import Codex, CodexCharacter, normalize_name
from services.safety.tag_rules import Rating, TagRules

ALLOW = "allow"
BLOCK = "block"
AMBIGUOUS_MODES = ("block", "flag")


@dataclass(frozen=True)
class SafetyInput:
    """One item to check: an image (decoded) and/or a caption or prompt, tags and character names."""

    item_id: str = ""
    image_id: str = ""
    caption: str = ""
    tags: tuple[str, ...] = ()
    characters: tuple[str, ...] = ()
    image: Any = None  # PIL.Image.Image or None
    embedding: Any = None  # the image's CLIP embedding (np.ndarray) when the caller computed it; then no image

    @property
    def empty(self) -> bool:
        no_image = self.image is None and self.embedding is None
        return no_image and not self.caption.strip() and not self.tags and not self.characters


@dataclass(frozen=True)
class Reason:
    rule_id: str
    message: str


@dataclass
class SafetyVerdict:
    item_id: str
    image_id: str
    rating: Rating
    decision: str  # allow | block
    reasons: list[Reason]
    flags: list[str]
    codex_version: int
    rating_scores: tuple[float, ...] = ()  # safe, questionable, explicit (only with an image)
    unknown_characters: list[str] = field(default_factory=list)
    matched_characters: list[str] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return self.decision == BLOCK


@dataclass(frozen=True)
class Policy:
    explicit_threshold: float = 0.5
    questionable_threshold: float = 0.5
    ambiguous_explicit: str = "block"

    def __post_init__(self) -> None:
        for name in ("explicit_threshold", "questionable_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.ambiguous_explicit not in AMBIGUOUS_MODES:
            raise ValueError(f"ambiguous_explicit must be one of {', '.join(AMBIGUOUS_MODES)}")

    def classifier_rating(self, scores: np.ndarray) -> Rating:
        """explicit when p(explicit) >= its threshold, questionable when p(q) + p(e) >= its threshold, else safe."""
        _, questionable, explicit = (float(x) for x in scores)
        if explicit >= self.explicit_threshold:
            return Rating.EXPLICIT
        if questionable + explicit >= self.questionable_threshold:
            return Rating.QUESTIONABLE
        return Rating.SAFE

    def decide(self, item: SafetyInput, scores: np.ndarray | None, codex: Codex, rules: TagRules) -> SafetyVerdict:
        cv = f"codex v{codex.version}"
        flags: list[str] = []
        reasons: list[Reason] = []

        tags = rules.match(list(item.tags), item.caption)
        rating = tags.rating
        if tags.explicit:
            flags.append("tags.explicit")
        elif tags.questionable:
            flags.append("tags.questionable")
        if scores is not None:
            by_classifier = self.classifier_rating(scores)
            if by_classifier > Rating.SAFE:
                flags.append(f"classifier.{by_classifier.label}")
            rating = max(rating, by_classifier)

        for tag in tags.blocked:
            reasons.append(Reason("tags.blocked", f"blocked tag {tag!r} ({cv})"))

        matched: list[CodexCharacter] = []
        unknown: list[str] = []
        unknown_keys: set[str] = set()
        for name in item.characters:
            c = codex.lookup(name)
            if c is None:
                key = normalize_name(name)
                if key and key not in unknown_keys:  # one report per name, however it is spelled
                    unknown_keys.add(key)
                    unknown.append(name.strip())
            elif c not in matched:
                matched.append(c)
        for tag in item.tags:
            c = codex.lookup(tag)
            if c is not None and c not in matched:
                matched.append(c)
        for c in codex.find_in_text(item.caption):
            if c not in matched:
                matched.append(c)
        if unknown:
            flags.append("codex.unknown_character")

        for c in matched:
            who = f"{c.name!r}" + (f" ({c.franchise})" if c.franchise else "")
            if c.age_class == "minor":
                if rating == Rating.EXPLICIT:
                    reasons.append(Reason("codex.minor_explicit", f"explicit content with minor-coded {who} ({cv})"))
                elif rating == Rating.QUESTIONABLE:
                    flags.append("codex.minor_questionable")
            if c.real_person:
                if rating == Rating.EXPLICIT:
                    reasons.append(
                        Reason("codex.real_person_explicit", f"explicit content with real person {who} ({cv})")
                    )
                elif rating == Rating.QUESTIONABLE:
                    flags.append("codex.real_person_questionable")
            if c.age_class == "ambiguous":
                if rating == Rating.EXPLICIT:
                    if self.ambiguous_explicit == "block":
                        reasons.append(
                            Reason("codex.ambiguous_explicit", f"explicit content with age-ambiguous {who} ({cv})")
                        )
                    else:
                        flags.append("codex.ambiguous_explicit")
                elif rating == Rating.QUESTIONABLE:
                    flags.append("codex.ambiguous_questionable")

        decision = BLOCK if reasons else ALLOW
        if not reasons:
            reasons.append(Reason("policy.allow", f"no blocking rule matched; rating {rating.label} ({cv})"))
        return SafetyVerdict(
            item_id=item.item_id,
            image_id=item.image_id,
            rating=rating,
            decision=decision,
            reasons=reasons,
            flags=list(dict.fromkeys(flags)),
            codex_version=codex.version,
            rating_scores=tuple(float(x) for x in scores) if scores is not None else (),
            unknown_characters=unknown,
            matched_characters=[c.name for c in matched],
        )
