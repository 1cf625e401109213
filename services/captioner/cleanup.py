"""Caption clean-up: filler openings removed, artist names scrubbed (character names of the item win),
character names guaranteed in content captions, whitespace, punctuation and length normalised."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from services.captioner.prompts import KindSpec

DEFAULT_FILLERS = Path(__file__).with_name("data") / "filler_openings.txt"

# Words that attribute a picture to an artist; scrubbed together with the name.
_ATTRIBUTION = (
    r"(?:(?:(?:art(?:work)?|drawn|made|painted|illustrated|created|done|drawing|painting|illustration)\s+)?by\s+"
    r"|in\s+the\s+(?:art\s+)?style\s+of\s+|(?:art\s+)?style\s+of\s+|@)?"
)
_QUALIFIER = re.compile(r"\s*\([^()]*\)\s*$")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def read_list(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, `#` comments and surrounding whitespace removed."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def display_name(name: str) -> str:
    """A character name as it should read in a caption: `twilight_sparkle_(mlp)` -> `Twilight Sparkle`.

    Underscores become spaces, a trailing booru qualifier in parentheses is dropped, and an all-lowercase
    name gets capitalised words; a name with capitals keeps them.
    """
    text = " ".join(name.replace("_", " ").split())
    stripped = _QUALIFIER.sub("", text)
    text = stripped or text
    if text == text.lower():
        text = " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    return text


def name_regex(name: str) -> str:
    """A pattern for `name` as whole words, any of space/underscore/hyphen between its words, case-insensitive."""
    words = [w for w in re.split(r"[\s_]+", name.strip()) if w]
    return r"(?<!\w)" + r"[\s_-]+".join(re.escape(w) for w in words) + r"(?:'s)?(?!\w)"


def _alternation(names: Iterable[str]) -> re.Pattern[str] | None:
    unique = sorted({" ".join(n.replace("_", " ").split()).lower() for n in names if n.strip()}, key=len, reverse=True)
    if not unique:
        return None
    return re.compile("|".join(f"(?:{name_regex(n)})" for n in unique), re.IGNORECASE)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def _join_names(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_SPLIT.split(text.strip()) if s]


def normalise_whitespace(text: str) -> str:
    """One space between words; punctuation runs collapsed; no space before punctuation; empty brackets removed."""
    text = " ".join(text.replace("\u200b", " ").split())
    text = re.sub(r"([!?.,;:])(?:\s*\1)+", r"\1", text)  # "! ! !" -> "!", ", ," -> ","
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    text = re.sub(r"\s+([,.;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r"[,;:]+\s*([.!?])", r"\1", text)  # ", ." -> "."
    text = re.sub(r"([.!?])[,;:]+", r"\1", text)
    text = re.sub(r"^[\s,.;:!?\-]+", "", text)
    text = re.sub(r"[\s,;:\-]+$", "", text)
    return " ".join(text.split())


def _capitalise_sentences(text: str) -> str:
    return " ".join(s[:1].upper() + s[1:] for s in sentences(text))


def truncate(text: str, max_chars: int) -> str:
    """At most `max_chars`: cut after the last whole sentence that fits, else at a word boundary."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if cut > 0:
        return head[: cut + 1]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head).rstrip(" ,;:-") + "."


class CaptionCleaner:
    """Turns raw VLM output into a caption.

    Order: whitespace -> filler openings -> artist names -> length (short: first sentence) -> character names
    -> whitespace and final punctuation. Character names are handled last so truncation cannot cut them.

    - Fillers: each listed opening ("the image depicts", "in this image", ...) is removed at the start of the
      caption and of each sentence, with the punctuation after it, repeatedly.
    - Artists: names from the blocklist and the item's own artist names are removed, with an attribution before
      them ("by", "art by", "in the style of", "@"). A character name of the item is never scrubbed: an artist
      name equal to one is dropped from the list, and matches inside a character name's span are kept.
    - Characters, content kinds (short, medium, long): every character name of the item appears in the caption;
      names the model left out are put in front: "Twilight Sparkle and Spike: <caption>". Style captions describe
      no content, so character names are removed from them instead.
    """

    def __init__(self, fillers: Sequence[str] = (), artists: Sequence[str] = ()) -> None:
        self.fillers = tuple(f for f in fillers if f.strip())
        self.artists = tuple(a for a in artists if a.strip())
        phrases = sorted({" ".join(f.lower().split()) for f in self.fillers}, key=len, reverse=True)
        self._filler = (
            re.compile(
                r"^(?:" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases) + r")(?!\w)[\s,:;\-]*",
                re.IGNORECASE,
            )
            if phrases
            else None
        )
        self._blocked = {_norm(a) for a in self.artists}
        self._artists = _alternation(self.artists)

    @classmethod
    def load(cls, filler_path: str | Path | None = None, blocklist_path: str | Path | None = None) -> CaptionCleaner:
        """Fillers from `filler_path` (default: the shipped list); artists from `blocklist_path` (default: none)."""
        fillers = read_list(filler_path or DEFAULT_FILLERS)
        artists = read_list(blocklist_path) if blocklist_path else []
        return cls(fillers, artists)

    def is_blocked_artist(self, name: str) -> bool:
        return _norm(name) in self._blocked

    # --- steps ---

    def strip_fillers(self, text: str) -> str:
        if self._filler is None:
            return text
        out = []
        for sentence in sentences(text):
            for _ in range(8):
                stripped = self._filler.sub("", sentence, count=1)
                if stripped == sentence:
                    break
                sentence = stripped
            if sentence:
                out.append(sentence[:1].upper() + sentence[1:])
        return " ".join(out)

    @staticmethod
    def _spans(text: str, names: Sequence[str]) -> list[tuple[int, int]]:
        pattern = _alternation(names)
        return [m.span() for m in pattern.finditer(text)] if pattern else []

    def scrub_artists(self, text: str, characters: Sequence[str] = (), artists: Sequence[str] = ()) -> str:
        """Removes blocklisted and the item's artist names (with their attribution) outside character names."""
        protected_names = {_norm(c) for c in characters} | {_norm(display_name(c)) for c in characters}
        protected = self._spans(text, [*characters, *(display_name(c) for c in characters)])

        def keep_or_drop(match: re.Match[str]) -> str:
            start, end = match.span()
            name = _norm(re.sub(r"^" + _ATTRIBUTION, "", match.group(0), flags=re.IGNORECASE).removesuffix("'s"))
            if name in protected_names or any(start < e and s < end for s, e in protected):
                return match.group(0)
            return " "

        patterns = [self._artists, _alternation(a for a in artists if _norm(a) not in protected_names)]
        for pattern in patterns:
            if pattern is not None:
                full = re.compile(_ATTRIBUTION + r"(?:" + pattern.pattern + r")", re.IGNORECASE)
                text = full.sub(keep_or_drop, text)
        return text

    @staticmethod
    def ensure_characters(text: str, characters: Sequence[str]) -> str:
        """Writes the names the caption has in their display form; puts the ones it lacks in front of it."""
        missing = []
        for raw in characters:
            name = display_name(raw)
            pattern = _alternation({name, raw})
            if not name or pattern is None:
                continue
            text, found = pattern.subn(lambda m, n=name: n + ("'s" if m.group(0).lower().endswith("'s") else ""), text)
            if not found:
                missing.append(name)
        missing = list(dict.fromkeys(missing))
        if not missing:
            return text
        if not text:
            return _join_names(missing) + "."
        return f"{_join_names(missing)}: {text}"

    @staticmethod
    def remove_characters(text: str, characters: Sequence[str]) -> str:
        pattern = _alternation([*characters, *(display_name(c) for c in characters)])
        return pattern.sub(" ", text) if pattern else text

    # --- all of it ---

    def clean(self, text: str, spec: KindSpec, characters: Sequence[str] = (), artists: Sequence[str] = ()) -> str:
        """The finished caption of kind `spec` (may be empty when nothing usable is left)."""
        characters = [c for c in characters if c.strip()]
        text = normalise_whitespace(text.strip().strip("\"'“”"))
        text = normalise_whitespace(self.strip_fillers(text))
        text = normalise_whitespace(self.scrub_artists(text, characters, artists))
        if spec.content:
            parts = sentences(text)
            text = parts[0] if (spec.one_sentence and parts) else text
            text = truncate(text, spec.max_chars)
            text = self.ensure_characters(normalise_whitespace(text), characters)
        else:
            text = truncate(normalise_whitespace(self.remove_characters(text, characters)), spec.max_chars)
        text = _capitalise_sentences(normalise_whitespace(text))
        if text and text[-1].isalnum():
            text += "."
        return text
