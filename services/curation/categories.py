"""The six content families of the dataset mix, their aliases, and a family guess from booru tags."""

from __future__ import annotations

from collections.abc import Iterable

# Order matters: it is the order of reports and of tie-breaks.
CATEGORIES: tuple[str, ...] = ("pony", "furry", "western", "anime", "realism", "other")

# The V7 target mix (DESIGN.md).
DEFAULT_MIX: dict[str, float] = {
    "pony": 0.10,
    "furry": 0.10,
    "western": 0.20,
    "anime": 0.25,
    "realism": 0.25,
    "other": 0.10,
}

_ALIASES = {
    "mlp": "pony",
    "my little pony": "pony",
    "ponies": "pony",
    "anthro": "furry",
    "cartoon": "western",
    "western cartoon": "western",
    "western_cartoon": "western",
    "comic": "western",
    "manga": "anime",
    "realistic": "realism",
    "photo": "realism",
    "photorealistic": "realism",
    "3d": "realism",
}

# Tags that reveal a family when a source names none (first match in CATEGORIES order wins).
_TAG_HINTS: dict[str, tuple[str, ...]] = {
    "pony": ("my little pony", "pony", "mlp", "equestria", "cutie mark"),
    "furry": ("furry", "anthro", "fursona", "feral"),
    "western": ("cartoon", "western", "comic", "disney"),
    "anime": ("anime", "manga", "1girl", "1boy"),
    "realism": ("realistic", "photorealistic", "photo", "photography", "3d"),
}


def normalize_category(value: str | None) -> str | None:
    """A known category name for `value` (aliases accepted, case-insensitive), or None."""
    if not value:
        return None
    key = value.strip().lower()
    if key in CATEGORIES:
        return key
    return _ALIASES.get(key) or _ALIASES.get(key.replace("_", " "))


def infer_category(tags: Iterable[str]) -> str:
    """The family named by the tags, else `other`."""
    have = {t.strip().lower().replace("_", " ") for t in tags}
    for category, hints in _TAG_HINTS.items():
        if any(h in have for h in hints):
            return category
    return "other"


def category_of(value: str | None, tags: Iterable[str]) -> str:
    """The given category when it is a known one, else a guess from the tags."""
    return normalize_category(value) or infer_category(tags)
