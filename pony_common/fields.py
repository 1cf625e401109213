"""Request field checks every servicer runs before a value reaches a model or the catalog: ids and free text
free of NUL bytes and control characters and within a length cap; a bad value is InvalidArgument naming the field.
The messages never echo the value (it may be huge or hostile)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from pony_common.errors import InvalidArgument

ID_MAX = 256  # ids: image (sha256 hex), item, job, run, rater, version ...
NAME_MAX = 256  # one tag, character or artist name, a source name
URI_MAX = 4096  # an image or model URI (a blob key, a path, a URL): PATH_MAX
TOKEN_MAX = 1024  # an opaque page token
SPEC_MAX = 1024 * 1024  # a training spec document (YAML)

# Ids and one-line text: no control character at all (C0, DEL, C1); ids also no format characters (bidi
# controls, zero-width), line/paragraph separators or surrogates, which hide what an id really is in logs.
_LINE_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ID_BAD = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]"
)
# Multi-line text (captions, prompts, YAML): tab, newline and carriage return are fine, other controls are not.
_TEXT_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _describe(char: str) -> str:
    if char == "\x00":
        return "a NUL byte"
    kind = "a control" if unicodedata.category(char) == "Cc" else "an invisible"
    return f"{kind} character (U+{ord(char):04X})"


def _check(value: str, field: str, max_len: int | None, bad: re.Pattern[str], what: str) -> str:
    if max_len is not None and len(value) > max_len:
        raise InvalidArgument(field, f"longer than {max_len} characters ({len(value)} given)")
    found = bad.search(value)
    if found is not None:
        raise InvalidArgument(field, f"contains {_describe(found.group())}; {what}")
    return value


def check_id(value: str, field: str, max_len: int = ID_MAX, *, required: bool = False) -> str:
    """An id: at most `max_len` characters, no control or invisible format character; empty only when optional."""
    if required and not value:
        raise InvalidArgument(field, "is required")
    return _check(value, field, max_len, _ID_BAD, "an id is printable text")


def check_ids(values: Iterable[str], field: str, max_len: int = ID_MAX) -> None:
    """Each id of a repeated field (`field[i]` names the bad one)."""
    for i, value in enumerate(values):
        check_id(value, f"{field}[{i}]", max_len)


def check_text(value: str, field: str, max_len: int | None = None, *, multiline: bool = True) -> str:
    """Free text: no NUL or control character (tab, newline and carriage return allowed when `multiline`) and at
    most `max_len` characters (None: the caller caps the length itself)."""
    bad = _TEXT_BAD if multiline else _LINE_BAD
    return _check(value, field, max_len, bad, "use printable text" if multiline else "use one line of printable text")


def check_names(values: Iterable[str], field: str, max_len: int = NAME_MAX) -> None:
    """Each one-line name of a repeated field (tags, character names): `field[i]` names the bad one."""
    for i, value in enumerate(values):
        check_text(value, f"{field}[{i}]", max_len, multiline=False)


def check_image_ref(ref: object, field: str) -> None:
    """A `pony.v1.ImageRef`'s text: `uri` one line within URI_MAX, `image_id` an id. Whether the URI may be read
    is the resolver's business; this only keeps hostile text out."""
    uri: str = getattr(ref, "uri", "")
    if uri:
        check_text(uri, f"{field}.uri", URI_MAX, multiline=False)
    check_id(getattr(ref, "image_id", ""), f"{field}.image_id")


def check_image_refs(refs: Iterable[object], field: str) -> None:
    """Each ImageRef of a repeated field (`field[i].uri`, `field[i].image_id`)."""
    for i, ref in enumerate(refs):
        check_image_ref(ref, f"{field}[{i}]")
