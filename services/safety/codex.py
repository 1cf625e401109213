"""The character codex: a versioned registry of characters (aliases, franchise, age class, real person), its YAML
file format (`ponyctl codex import/export`), and name lookup that never guesses. `store.py` keeps it in the catalog.

A name matches a character when it equals the character's name or one of its aliases after the normalisation of
`pony_common.textnorm` (the one every safety rule uses): NFKC, case folding, invisible characters removed,
confusables folded to Latin, `_`/`-`/whitespace runs as one space (so `Twilight_Sparkle`, `twilight  sparkle`,
`Ｔｗｉｌｉｇｈｔ Sparkle`, `Twi\u200blight Sparkle` and `Twilight Sparkle` are one name). Text (captions, prompts)
is searched for whole-word occurrences of names and aliases with punctuation ignored. Anything else is reported as
unknown.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pony_common.textnorm import bare_key, tag_key, words_key

AGE_CLASSES = ("adult", "minor", "ambiguous")
CHARACTER_KEYS = ("name", "aliases", "franchise", "age_class", "real_person")
MAX_NAME_LENGTH = 255


class CodexFormatError(ValueError):
    """A codex file that cannot be used; the message is one line naming the place at fault."""


def normalize_name(name: str) -> str:
    """The lookup key of a character name (`pony_common.textnorm.tag_key`)."""
    return tag_key(name)


def text_key(text: str) -> str:
    """`normalize_name` with punctuation (other than apostrophes) as spaces: how names are found inside text
    (`pony_common.textnorm.words_key`)."""
    return words_key(text)


def row_key(name: str) -> str:
    """The catalog row key of a character (`codex_characters.key`): NFKC, lower case, `_` as space, whitespace
    collapsed. It stays as rows were written; lookups never use it (they compare `normalize_name` keys)."""
    return " ".join(unicodedata.normalize("NFKC", name).lower().replace("_", " ").split())


@dataclass(frozen=True)
class CodexCharacter:
    name: str
    aliases: tuple[str, ...] = ()
    franchise: str = ""
    age_class: str = "adult"
    real_person: bool = False

    @property
    def key(self) -> str:
        """The catalog row key (`row_key`)."""
        return row_key(self.name)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "franchise": self.franchise,
            "age_class": self.age_class,
            "real_person": self.real_person,
        }


def check_unique(characters: Sequence[CodexCharacter], where: str) -> None:
    """Raises CodexFormatError when a name or alias of one character is also one of another's."""
    owners: dict[str, tuple[int, str]] = {}
    for i, c in enumerate(characters):
        for spelled in c.names:
            for key in {normalize_name(spelled), text_key(spelled)}:
                if not key:
                    raise CodexFormatError(f"{where}: character {c.name!r} has a name or alias with no letters")
                other = owners.get(key)
                if other is not None and other[0] != i:
                    raise CodexFormatError(
                        f"{where}: {spelled!r} of {c.name!r} is the same name as {other[1]!r} of another character"
                    )
                owners[key] = (i, spelled)


def _character(raw: Any, where: str) -> CodexCharacter:
    if not isinstance(raw, dict):
        raise CodexFormatError(f"{where}: must be a mapping with name, age_class, …")
    unknown = sorted(set(raw) - set(CHARACTER_KEYS))
    if unknown:
        raise CodexFormatError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(CHARACTER_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CodexFormatError(f"{where}.name: must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise CodexFormatError(f"{where}.name: longer than {MAX_NAME_LENGTH} characters")
    aliases = raw.get("aliases", [])
    if aliases is None:
        aliases = []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise CodexFormatError(f"{where}.aliases: must be a list of non-empty strings")
    franchise = raw.get("franchise", "")
    if franchise is None:
        franchise = ""
    if not isinstance(franchise, str):
        raise CodexFormatError(f"{where}.franchise: must be a string")
    if "age_class" not in raw:
        raise CodexFormatError(f"{where}.age_class: missing (one of {', '.join(AGE_CLASSES)})")
    age_class = raw["age_class"]
    if age_class not in AGE_CLASSES:
        raise CodexFormatError(f"{where}.age_class: {age_class!r} is not one of {', '.join(AGE_CLASSES)}")
    real_person = raw.get("real_person", False)
    if not isinstance(real_person, bool):
        raise CodexFormatError(f"{where}.real_person: must be true or false")
    own = {normalize_name(name)}
    cleaned = []
    for alias in aliases:
        if normalize_name(alias) not in own:
            own.add(normalize_name(alias))
            cleaned.append(alias.strip())
    return CodexCharacter(name.strip(), tuple(cleaned), franchise.strip(), age_class, real_person)


def parse_codex(text: str, source: str = "codex") -> list[CodexCharacter]:
    """Characters from codex YAML (`characters: [{name, aliases, franchise, age_class, real_person}, …]`).

    Raises CodexFormatError with one line naming `source` and the entry at fault.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CodexFormatError(f"{source}: not valid YAML{where}") from None
    if not isinstance(data, dict) or "characters" not in data:
        raise CodexFormatError(f"{source}: expected a mapping with a 'characters' list")
    unknown = sorted(set(data) - {"characters", "codex_version", "note"})
    if unknown:
        raise CodexFormatError(f"{source}: unknown top-level key {unknown[0]!r}")
    raw = data["characters"]
    if not isinstance(raw, list):
        raise CodexFormatError(f"{source}: 'characters' must be a list")
    characters = [_character(entry, f"{source}: characters[{i}]") for i, entry in enumerate(raw)]
    check_unique(characters, source)
    return characters


def dump_codex(characters: Iterable[CodexCharacter], version: int) -> str:
    """Codex YAML (characters sorted by name) that `parse_codex` reads back to the same characters."""
    ordered = sorted(characters, key=lambda c: c.key)
    return yaml.safe_dump(
        {"codex_version": version, "characters": [c.to_dict() for c in ordered]},
        sort_keys=False,
        allow_unicode=True,
    )


@dataclass
class Codex:
    """One version of the codex, indexed for lookup by name and for finding names in text."""

    version: int
    characters: tuple[CodexCharacter, ...] = ()
    _by_name: dict[str, CodexCharacter] = field(default_factory=dict, repr=False)
    _by_text: dict[str, CodexCharacter] = field(default_factory=dict, repr=False)
    _max_words: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        for c in self.characters:
            for spelled in c.names:
                self._by_name.setdefault(normalize_name(spelled), c)
                key = text_key(spelled)
                self._by_text.setdefault(key, c)
                self._max_words = max(self._max_words, len(key.split()))

    def lookup(self, name: str) -> CodexCharacter | None:
        """The character `name` names exactly (after normalisation, prompt weights and punctuation dropped:
        `(Apple Bloom:1.2)`), else None: never a near match."""
        key = normalize_name(name)
        return self._by_name.get(key) or self._by_text.get(text_key(name)) or self._by_text.get(bare_key(key))

    def find_in_text(self, text: str) -> list[CodexCharacter]:
        """Characters whose name or alias occurs in `text` as whole words (longest match first, in order)."""
        words = text_key(text).split()
        found: list[CodexCharacter] = []
        i = 0
        while i < len(words):
            for n in range(min(self._max_words, len(words) - i), 0, -1):
                c = self._by_text.get(" ".join(words[i : i + n]))
                if c is not None:
                    if c not in found:
                        found.append(c)
                    i += n
                    break
            else:
                i += 1
        return found
