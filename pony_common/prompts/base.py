"""What every model family's prompt convention shares: the special-tag vocabulary (source, rating, palette), the
style tag format, the order of a prompt, and the `PromptConvention` base the per-family modules fill in.

A prompt is `special tags, factual description, stylistic description, extra content tags`, joined with ", ".
The special tags, in order: score tag(s) (the family's form, see v6.py / v7.py), style cluster tag(s), the source
tag, the rating tag, then palette tags. Palette tags (`palette_<colour>`, the style tagger's dominant colours, the
colour control of a prompt) are special tags: exported, trained and sent by the sampler in that place, and never
dropped to fit the text encoder's token budget (budget.py); a training run's caption spec may still drop special
tags on purpose (`keep_special_tags: false`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Content family -> source tag (DESIGN: source_pony|furry|cartoon|anime|...); `other` has none.
SOURCE_TAGS = {
    "pony": "source_pony",
    "furry": "source_furry",
    "western": "source_cartoon",
    "anime": "source_anime",
    "realism": "source_realism",
}
RATINGS = ("safe", "questionable", "explicit")
# The style tagger's colour vocabulary (services/style_tagger/palette.py names the same colours; a test checks).
PALETTE_COLORS = (
    "black",
    "gray",
    "silver",
    "white",
    "red",
    "maroon",
    "orange",
    "brown",
    "beige",
    "yellow",
    "olive",
    "lime",
    "green",
    "teal",
    "cyan",
    "sky_blue",
    "blue",
    "navy",
    "purple",
    "magenta",
    "pink",
)
PALETTE_PREFIX = "palette_"
DEFAULT_STYLE_TAG_FORMAT = "style_cluster_{n}"
TOP_BUCKET = 9


def source_tag(category: str | None) -> str | None:
    """`source_<family>` for a content family, None for `other` or an unknown one."""
    return SOURCE_TAGS.get((category or "").lower())


def rating_tag(rating: str | None) -> str | None:
    """`rating_safe|questionable|explicit`, None for anything else."""
    value = (rating or "").lower().removeprefix("rating_")
    return f"rating_{value}" if value in RATINGS else None


def palette_tag(colour: str) -> str:
    """`palette_<colour>` for a known colour name, given bare (`sky_blue`) or as a tag; ValueError otherwise."""
    name = colour.strip().lower().removeprefix(PALETTE_PREFIX)
    if name not in PALETTE_COLORS:
        raise ValueError(f"unknown palette colour {colour!r}; known: {', '.join(PALETTE_COLORS)}")
    return PALETTE_PREFIX + name


def palette_tags(colours: Iterable[str]) -> list[str]:
    """The known palette tags among `colours` (catalog values), in order, each once; unknown ones left out."""
    out = []
    for colour in colours:
        try:
            out.append(palette_tag(colour))
        except ValueError:
            continue
    return list(dict.fromkeys(out))


def family_token(family: str) -> str:
    """The `{family}` of a style tag: lower-case, runs of other characters as `_`; empty (a global cluster set)
    is `style`. The style tagger formats its cluster tags the same way."""
    token = re.sub(r"[^a-z0-9]+", "_", (family or "").lower()).strip("_")
    return token or "style"


def style_tag(tag_format: str, n: int, family: str = "") -> str:
    """Cluster `n`'s tag in `tag_format` (`{n}`, optionally `{family}`). With no family the format falls back to
    the global family token (`style`), which is what the style tagger writes for a set not fitted per family."""
    try:
        return tag_format.format(n=n, family=family_token(family))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"style tag format {tag_format!r} is not usable: {exc}") from None


def join_v7(special: Iterable[str], descriptions: Iterable[str | None], extra: Iterable[str] = ()) -> str:
    """`special tags, descriptions (factual, then stylistic), extra tags` joined with ", ", empty parts dropped."""
    return ", ".join(p for p in (*special, *descriptions, *extra) if p)


def sentence(text: str | None) -> str:
    """Whitespace collapsed to single spaces."""
    return " ".join((text or "").split())


def special_tags(
    score_tags: str | Sequence[str] | None = None,
    style_tag: str | Sequence[str] | None = None,
    source: str | None = None,
    rating: str | None = None,
    palette: Sequence[str] = (),
    *,
    unique: bool = True,
) -> list[str]:
    """The special tags in order: score tag(s), style cluster tag(s), source tag, rating tag, palette tags (empty
    ones left out; with `unique`, a repeated tag only once). `score_tags` is one tag or several (a list or a
    comma-separated string)."""
    if isinstance(score_tags, str):
        score_tags = [t.strip() for t in score_tags.split(",")]
    styles = [style_tag] if isinstance(style_tag, str) else list(style_tag or ())
    out = [t for t in (*(score_tags or ()), *styles, source, rating, *palette) if t]
    return list(dict.fromkeys(out)) if unique else out


def assemble_prompt(
    special: Iterable[str] = (),
    factual: str | None = None,
    style: str | None = None,
    extra_tags: Iterable[str] = (),
) -> str:
    """`special tags, factual description, style description, extra tags` joined with ", " (empty parts dropped;
    whitespace collapsed; an extra tag already among the special tags is not repeated)."""
    special = [t for t in special if t]
    return join_v7(special, [sentence(factual), sentence(style)], extra_tags_of(special, extra_tags))


def extra_tags_of(special: Sequence[str], extra: Iterable[str]) -> list[str]:
    """Extra tags stripped, each once, none that is already a special tag."""
    seen = set(special)
    return [t for t in dict.fromkeys(t.strip() for t in extra) if t and t not in seen]


@dataclass(frozen=True)
class ImageTags:
    """What the special tags of one image (or one request) are made of: a score bucket, style tags, a source tag,
    a rating tag and palette tags (already formatted; empty values add nothing)."""

    bucket: int | None = None
    styles: tuple[str, ...] = ()
    source: str | None = None
    rating: str | None = None
    palette: tuple[str, ...] = ()


class PromptConvention:
    """One model family's prompt convention. Subclasses define the score tags and the token budget."""

    name: str = ""
    # The text encoder's token budget of a prompt (special tokens included) and where its tokenizer is found.
    max_tokens: int = 0

    def score_tags(self, bucket: int) -> list[str]:
        """The score tags true of an image in `bucket` (exported and trained)."""
        raise NotImplementedError

    def score_query(self, bucket: int) -> list[str]:
        """The score tags a prompt asking for `bucket` or better sends: only tags that training put on images of a
        bucket >= `bucket`."""
        raise NotImplementedError

    def image_special_tags(self, tags: ImageTags) -> list[str]:
        """An image's special tags in order, each once."""
        score = self.score_tags(check_bucket(tags.bucket)) if tags.bucket is not None else []
        return special_tags(score, list(tags.styles), tags.source, tags.rating, list(tags.palette))

    def query_special_tags(self, tags: ImageTags, *, unique: bool = True) -> list[str]:
        """A request's special tags in order: `tags.bucket` is the lowest score bucket asked for."""
        score = self.score_query(check_bucket(tags.bucket)) if tags.bucket is not None else []
        return special_tags(score, list(tags.styles), tags.source, tags.rating, list(tags.palette), unique=unique)


def check_bucket(bucket: int) -> int:
    if not 0 <= bucket <= TOP_BUCKET:
        raise ValueError(f"score bucket must be in 0..{TOP_BUCKET}, got {bucket}")
    return bucket
