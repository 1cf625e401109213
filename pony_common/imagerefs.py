"""Turns a `pony.v1.ImageRef` (bytes, URI or raw RGB pixels) into a decoded image and its content-hash id."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from pony_common.access import ImageAccess
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.fields import check_image_ref
from pony_common.images import decode_image, image_id, raw_image


@dataclass
class LoadedImage:
    image_id: str
    image: Image.Image
    data: bytes


class ImageResolver:
    """Reads ImageRefs: inline bytes, or a uri under the access policy (`pony_common.access`): a blob-store key
    (`images/ab/…`) by default, a local path or http(s) URL only under the allow-listed roots and hosts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.access = ImageAccess(settings)

    def read(self, ref: object, field: str) -> bytes:
        check_image_ref(ref, field)  # NUL bytes, control characters, over-long text: refused before any lookup
        which = ref.WhichOneof("source")  # type: ignore[attr-defined]
        if which == "data":
            return bytes(ref.data)  # type: ignore[attr-defined]
        if which == "uri":
            return self.access.read(ref.uri, f"{field}.uri")  # type: ignore[attr-defined]
        if which == "raw":
            return bytes(ref.raw.pixels)  # type: ignore[attr-defined]
        raise InvalidArgument(field, "image has neither data, uri nor raw")

    def raw(self, ref: object, data: bytes, field: str) -> Image.Image | None:
        """The image of a `raw` ref (its pixels `data`, as `read` returned them; the pixel limit of encoded images),
        None for any other ref."""
        if getattr(ref, "WhichOneof", None) is None or ref.WhichOneof("source") != "raw":  # type: ignore[attr-defined]
            return None
        raw = ref.raw  # type: ignore[attr-defined]
        return raw_image(raw.width, raw.height, data, field=field, max_pixels=self.settings.max_image_pixels)

    def load(self, ref: object, field: str) -> LoadedImage:
        """Decodes safely; raises InvalidArgument naming `field` for anything unusable."""
        data = self.read(ref, field)
        img = self.raw(ref, data, field) or decode_image(
            data, field=field, formats=self.settings.image_formats, max_pixels=self.settings.max_image_pixels
        )
        given = getattr(ref, "image_id", "")
        return LoadedImage(given or image_id(data), img, data)
