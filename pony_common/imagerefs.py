"""Turns a `pony.v1.ImageRef` (bytes or URI) into a decoded image and its content-hash id."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from pony_common.blobs import BlobStore, open_uri
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.images import decode_image, image_id


@dataclass
class LoadedImage:
    image_id: str
    image: Image.Image
    data: bytes


class ImageResolver:
    """Reads ImageRefs: inline bytes, a blob-store key (`images/ab/…`), a local path or any fsspec URI."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.blobs = BlobStore(settings.blob_url)

    def read(self, ref: object, field: str) -> bytes:
        which = ref.WhichOneof("source")  # type: ignore[attr-defined]
        if which == "data":
            return bytes(ref.data)  # type: ignore[attr-defined]
        if which == "uri":
            uri: str = ref.uri  # type: ignore[attr-defined]
            try:
                if "://" not in uri and not uri.startswith("/"):
                    return self.blobs.get(uri)
                return open_uri(uri)
            except FileNotFoundError:
                raise InvalidArgument(f"{field}.uri", f"no such image: {uri}") from None
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"{field}.uri", f"cannot read {uri}: {exc}") from None
        raise InvalidArgument(field, "image has neither data nor uri")

    def load(self, ref: object, field: str) -> LoadedImage:
        """Decodes safely; raises InvalidArgument naming `field` for anything unusable."""
        data = self.read(ref, field)
        img = decode_image(
            data, field=field, formats=self.settings.image_formats, max_pixels=self.settings.max_image_pixels
        )
        given = getattr(ref, "image_id", "")
        return LoadedImage(given or image_id(data), img, data)
