"""Turns a `pony.v1.ImageRef` (bytes or URI) into a decoded image and its content-hash id."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from pony_common.access import ImageAccess
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.fields import check_image_ref
from pony_common.images import decode_image, image_id


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
        raise InvalidArgument(field, "image has neither data nor uri")

    def load(self, ref: object, field: str) -> LoadedImage:
        """Decodes safely; raises InvalidArgument naming `field` for anything unusable."""
        data = self.read(ref, field)
        img = decode_image(
            data, field=field, formats=self.settings.image_formats, max_pixels=self.settings.max_image_pixels
        )
        given = getattr(ref, "image_id", "")
        return LoadedImage(given or image_id(data), img, data)
