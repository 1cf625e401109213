"""Request budgets: what one call may make a service spend (items, image bytes read, pixels decoded at once), and
the budgeted loading of a request's ImageRefs, whose pixel sums come from the image headers before any pixel is
decoded.

    budget = RequestBudget.from_settings(settings, settings.scorer.max_batch, "PONY_SCORER_MAX_BATCH")
    budget.check_items(len(refs), "images")
    loaded = load_images(resolver, [(f"images[{i}]", ref) for i, ref in enumerate(refs)], budget, "images")

A request over a budget is INVALID_ARGUMENT naming its list field, the budget and the setting that sets it, not
RESOURCE_EXHAUSTED: the same request never fits, and callers (the Celery tasks) retry RESOURCE_EXHAUSTED as
overload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.imagerefs import ImageResolver, LoadedImage
from pony_common.images import image_id, load_image, open_image

PIXELS_SETTING = "PONY_REQUEST_MAX_PIXELS"
BYTES_SETTING = "PONY_REQUEST_MAX_IMAGE_BYTES"


@dataclass(frozen=True)
class RequestBudget:
    """Per request: at most `max_items` items, `max_bytes` image bytes read (inline and by reference), and
    `max_pixels` pixels decoded at once (the declared sizes of the images a call holds decoded together)."""

    max_items: int
    max_pixels: int
    max_bytes: int
    items_setting: str = ""  # the setting behind `max_items`, named in the refusal

    @classmethod
    def from_settings(cls, settings: Settings, max_items: int, items_setting: str = "") -> RequestBudget:
        return cls(max_items, settings.request_max_pixels, settings.request_max_image_bytes, items_setting)

    def check_items(self, count: int, field: str) -> None:
        """InvalidArgument(field) when `count` items are more than the budget."""
        if count > self.max_items:
            setting = f" ({self.items_setting})" if self.items_setting else ""
            raise InvalidArgument(field, f"{count} given; at most {self.max_items} per call{setting}")

    def check_bytes(self, total: int, field: str) -> None:
        if total > self.max_bytes:
            raise InvalidArgument(
                field,
                f"the images come to more than {self.max_bytes:,} bytes, the most one request may read "
                f"({BYTES_SETTING}): send fewer or smaller images per call",
            )

    def check_pixels(self, total: int, field: str, count: int) -> None:
        if total > self.max_pixels:
            raise InvalidArgument(
                field,
                f"{count} images declare {total:,} pixels; one request may have at most {self.max_pixels:,} "
                f"decoded at once ({PIXELS_SETTING}): send fewer or smaller images per call",
            )


@dataclass
class OpenedImage:
    """A ref read and its header parsed: the bytes and the unloaded PIL image; no pixel is decoded yet."""

    field: str
    ref: object
    data: bytes
    probe: Image.Image

    @property
    def pixels(self) -> int:
        width, height = self.probe.size
        return width * height

    def decode(self) -> LoadedImage:
        """The decoded RGB image; InvalidArgument naming this image's field for a truncated or corrupt file."""
        image = load_image(self.probe, field=self.field)
        return LoadedImage(getattr(self.ref, "image_id", "") or image_id(self.data), image, self.data)


def open_images(
    resolver: ImageResolver,
    refs: Sequence[tuple[str, object]],
    budget: RequestBudget,
    field: str,
    group: int = 0,
) -> list[OpenedImage | InvalidArgument]:
    """Reads each `(field, ref)` in order and parses its header only. A ref that cannot be read, or whose header is
    refused (format, per-image pixel limit), is its InvalidArgument: that item's failure, not the request's.

    Raises InvalidArgument(field) before any pixel is decoded when the bytes read pass `budget.max_bytes` (reading
    stops there) or when the declared pixels of the images decoded together pass `budget.max_pixels`: all of them,
    or each run of `group` consecutive refs when a caller decodes them `group` at a time (a stream's batches).
    """
    settings = resolver.settings
    opened: list[OpenedImage | InvalidArgument] = []
    read = 0
    for item_field, ref in refs:
        try:
            data = resolver.read(ref, item_field)
        except InvalidArgument as exc:
            opened.append(exc)
            continue
        read += len(data)
        budget.check_bytes(read, field)
        try:
            probe = resolver.raw(ref, data, item_field) or open_image(
                data, field=item_field, formats=settings.image_formats, max_pixels=settings.max_image_pixels
            )
        except InvalidArgument as exc:
            opened.append(exc)
        else:
            opened.append(OpenedImage(item_field, ref, data, probe))
    step = group or max(1, len(opened))
    for start in range(0, len(opened), step):
        images = [x for x in opened[start : start + step] if isinstance(x, OpenedImage)]
        budget.check_pixels(sum(x.pixels for x in images), field, len(images))
    return opened


def decode(opened: OpenedImage | InvalidArgument) -> LoadedImage:
    """`opened` decoded; its InvalidArgument raised when it is one."""
    if isinstance(opened, InvalidArgument):
        raise opened
    return opened.decode()


def _decode_or_error(opened: OpenedImage | InvalidArgument) -> LoadedImage | InvalidArgument:
    try:
        return decode(opened)
    except InvalidArgument as exc:
        return exc


def load_images(
    resolver: ImageResolver,
    refs: Sequence[tuple[str, object]],
    budget: RequestBudget,
    field: str,
    mapper: Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]] = map,
) -> list[LoadedImage | InvalidArgument]:
    """`open_images` (the request refused over a budget before any pixel is decoded), then each image decoded
    (`mapper`: `map`, or an executor's `map` to decode in parallel); one result per ref, in order, a bad image its
    InvalidArgument."""
    opened = open_images(resolver, refs, budget, field)
    return list(mapper(_decode_or_error, opened))


def load_image_ref(resolver: ImageResolver, ref: object, field: str, budget: RequestBudget) -> LoadedImage:
    """One ref under the budget (a request with a single image); its InvalidArgument raised."""
    return decode(open_images(resolver, [(field, ref)], budget, field)[0])
