"""Comparison keys for text that safety rules match (tags, captions, prompts, character names), so that no spelling
trick slips past a rule: fullwidth forms, case, invisible characters, lookalike letters, `_`/space/`-` variants.

Only keys are normalised: what callers sent and what is returned to them is never rewritten.

`fold(text)` is the comparison form of any text:
1. Unicode NFKC (fullwidth `ｌｏｌｉ`, ligatures, superscripts, compatibility spaces -> their plain forms);
2. case folding (`str.casefold`);
3. removal of invisible characters: every format character (category Cf: zero-width space/joiners U+200B-U+200D,
   word joiner U+2060, BOM U+FEFF, soft hyphen U+00AD, bidi controls U+202A-U+202E, U+2066-U+2069, U+200E/F,
   U+061C, tag characters ...) and the other default-ignorable code points (variation selectors, the combining
   grapheme joiner, Hangul fillers ...);
4. confusable folding to Latin: each non-ASCII character whose Unicode confusables prototype (UTS #39
   confusables.txt, as the PyPI package `confusable-homoglyphs` ships it) is ASCII becomes that prototype
   (Cyrillic `а` -> `a`, `ℓ` -> `l`, `ｌ` -> `l`; an uppercase lookalike such as Cyrillic `Т` folds through its own
   prototype; a Latin letter with a stroke, bar or hook, or a small capital, is its base letter: `ł`, `ʟ` -> `l`),
   and combining marks on such a letter are dropped (`lòlì`, `l̶o̶l̶i̶` -> `loli`); marks on other
   scripts' letters stay (Japanese `ガ` is not `カ`). ASCII itself is only case folded: `pom` is not `porn` and
   `1girl` stays `1girl` (the skeleton's `m` -> `rn`, `1` -> `l` would make them so);
5. NFKC again: `fold(fold(x)) == fold(x)` for every code point.

`tag_key` adds the tag spelling rules (`blocked_tag`, `blocked tag`, `blocked-tag`, `Blocked—Tag` are one key);
`words_key` is the form whole-word search runs on; `split_tags` cuts a prompt at its commas (any comma form);
`bare_key` drops prompt weights and punctuation from a key (`(loli:1.3)` -> `loli`).
"""

from __future__ import annotations

import functools
import re
import unicodedata

# Named for reference and tests: `fold` removes every Cf character, which covers all of these.
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
SOFT_HYPHEN = "\u00ad"
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"

# Default-ignorable code points (Unicode DerivedCoreProperties) that are not category Cf: they render as nothing.
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors, vowel separator
    (0x2065, 0x2065),
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xFFF0, 0xFFF8),
    (0x1D173, 0x1D17A),  # musical symbol format controls
    (0xE0000, 0xE0FFF),  # tags, variation selectors supplement
)
_IGNORABLE = frozenset(chr(cp) for lo, hi in _IGNORABLE_RANGES for cp in range(lo, hi + 1))
_MARKS = ("Mn", "Me")
# ASCII punctuation a confusable may fold to: the separators tag keys and text keys care about.
_PUNCTUATION_TARGETS = frozenset(",-_' ")
_TAG_SEPARATORS = re.compile(r"[\s_\-\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u2e5d"
                             r"\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d\U00010ead]+")  # fmt: skip
_NOT_WORD = re.compile(r"[^\w']+|_+")
_COMMAS = re.compile(r"[,\u3001\u060c\ufe50\uff0c\uff64]")  # `,` and the ideographic, Arabic, small, fullwidth ones
# A Latin letter with an overlay no decomposition removes (stroke, bar, hook, curl: `ł`, `ƚ`, `ɭ`) or a small capital
# (`ʟ`, `ᴏ`): Unicode names its base letter, which it is compared as.
_LATIN_VARIANT = re.compile(r"LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL )?([A-Z])(?: WITH .+)?")
# Prompt weights (`tag:1.3`) and every character other than a letter, digit or space: what `bare_key` drops.
_WEIGHT = re.compile(r":\s*[+-]?(?:\d+\.?\d*|\.\d+)")
_NOT_LETTER = re.compile(r"[^\w\s]|_")


def _ascii_target(prototype: str) -> bool:
    return prototype.isascii() and all(c.isalnum() or c in _PUNCTUATION_TARGETS for c in prototype)


@functools.cache
def skeleton_table() -> dict[str, str]:
    """Non-ASCII character -> its ASCII confusables prototype, built once per process from `confusable-homoglyphs`'
    data.

    The package stores confusables.txt's `source -> prototype` lines both ways. A source has exactly one line and
    never appears in a prototype, so a character with one entry whose other end has several (or is a string of
    several characters) is a source; a pair whose both ends have one entry keeps the ASCII end as the prototype.
    Only ASCII prototypes (letters, digits and the separators `, - _ '`) are kept: folding goes to Latin. A
    prototype that is the skeleton of one ASCII character (`rn` of `m`, `''` of `"`) is that character, since
    ASCII itself is not folded.
    """
    from confusable_homoglyphs.confusables import confusables_data

    def clean(s: str) -> str:
        return s.replace("\u200e", "")  # the package wraps right-to-left characters in LRM marks

    edges: dict[str, set[str]] = {}
    for key, entries in confusables_data.items():
        edges.setdefault(clean(key), set()).update(clean(e["c"]) for e in entries)
    prototypes: dict[str, str] = {}
    for source, ends in edges.items():
        if len(source) != 1 or len(ends) != 1:
            continue
        (prototype,) = ends
        if not prototype or prototype == source:
            continue
        if len(prototype) == 1 and len(edges.get(prototype, ())) == 1 and source.isascii():
            continue  # a pair of two single entries: the ASCII end is the prototype
        prototypes[source] = prototype
    ascii_back = {p: s for s, p in prototypes.items() if s.isascii() and len(p) > 1}
    return {
        source: ascii_back.get(prototype, prototype)
        for source, prototype in prototypes.items()
        if not source.isascii() and _ascii_target(prototype)
    }


@functools.lru_cache(maxsize=65536)
def _letter(ch: str) -> str:
    """One (non-mark) character folded: case folded, then to its ASCII prototype. An uppercase lookalike whose
    lower case has none (Cyrillic `Т`, `В`, `Н`) folds through its own prototype (`T` -> `t`)."""
    table = skeleton_table()
    mapped = "".join(table.get(c) or _latin_base(c) for c in ch.casefold())
    if not mapped.isascii() and ch in table:
        mapped = table[ch]
    return mapped.casefold()


def _latin_base(ch: str) -> str:
    """The base letter of a Latin letter with a stroke, bar or hook, or of a small capital; else `ch` itself."""
    variant = None if ch.isascii() else _LATIN_VARIANT.fullmatch(unicodedata.name(ch, ""))
    return variant.group(1) if variant else ch


def fold(text: str) -> str:
    """The comparison form of `text` (see the module docstring); spacing and punctuation are kept."""
    if text.isascii():
        return text.casefold()
    out: list[str] = []
    on_ascii = False
    for ch in unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text)):
        category = unicodedata.category(ch)
        if category == "Cf" or ch in _IGNORABLE:
            continue
        pieces = (ch,) if category in _MARKS else unicodedata.normalize("NFD", _letter(ch))
        for c in pieces:
            if unicodedata.category(c) in _MARKS:
                if not on_ascii:
                    out.append(c)
            else:
                out.append(c)
                on_ascii = c.isascii()
    return unicodedata.normalize("NFKC", "".join(out))


def tag_key(tag: str) -> str:
    """The key a tag or name compares by: `fold`, then `_`, hyphens, dashes and whitespace runs as one space."""
    return " ".join(_TAG_SEPARATORS.sub(" ", fold(tag)).split())


def words_key(text: str) -> str:
    """`fold` with every run of characters other than letters, digits and apostrophes as one space: the form in
    which names and words are found inside free text (`Twilight's  cutie-mark!` -> `twilight's cutie mark`)."""
    return " ".join(_NOT_WORD.sub(" ", fold(text)).split())


def bare_key(key: str) -> str:
    """A tag key without prompt weights and punctuation: `(loli:1.3)`, `#loli`, `[[loli]]`, `l.o.l.i` -> `loli`. A
    second key a prompt piece is also compared by, so emphasis syntax and dotted spellings do not hide a tag;
    spaces stay (`shot a` is not `shota`)."""
    return " ".join(_NOT_LETTER.sub("", _WEIGHT.sub(" ", key)).split())


def split_tags(text: str) -> list[str]:
    """The tag keys of the comma-separated pieces of `text` (any comma form), in order, empty pieces dropped."""
    return [key for key in (tag_key(p) for p in _COMMAS.split(fold(text))) if key]
