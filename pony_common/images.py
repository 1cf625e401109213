"""Safe image decoding (format allow-list, pixel limit read from the header before any pixel is decoded, truncation,
EXIF orientation, RGB) and content-hash ids."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterable

from PIL import Image, ImageOps, UnidentifiedImageError

from pony_common.errors import InvalidArgument

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_PIXELS = 64_000_000


def image_id(data: bytes) -> str:
    """The content-hash id of an image: sha256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def open_image(
    data: bytes,
    *,
    field: str = "image",
    formats: Iterable[str] = DEFAULT_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Reads only the header of untrusted bytes: the image comes back unloaded (PIL opens lazily), so its `size`
    is known and no pixel has been decoded or allocated; `load_image` decodes it.

    Raises InvalidArgument(field, reason) for empty input, unknown or disallowed formats and images over
    `max_pixels` (decompression bombs are refused before any pixel is decoded).
    """
    if not data:
        raise InvalidArgument(field, "empty image")
    allowed = {f.upper() for f in formats}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data), formats=sorted(allowed))
    except UnidentifiedImageError:
        raise InvalidArgument(field, f"not a decodable image (allowed formats: {', '.join(sorted(allowed))})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument(field, f"image has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(field, f"cannot read image header: {exc}") from None
    width, height = probe.size
    if width <= 0 or height <= 0:
        raise InvalidArgument(field, "image has no pixels")
    if width * height > max_pixels:
        raise InvalidArgument(field, f"image is {width}x{height}, more than {max_pixels} pixels")
    return probe


def load_image(probe: Image.Image, *, field: str = "image") -> Image.Image:
    """Decodes an image `open_image` returned into RGB with EXIF orientation applied; InvalidArgument(field) for a
    truncated or corrupt file."""
    try:
        probe.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(field, f"truncated or corrupt image: {exc}") from None
    img = ImageOps.exif_transpose(probe) or probe
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P") and ("transparency" in img.info or img.mode in ("RGBA", "LA")):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            img = background
        else:
            img = img.convert("RGB")
    return img


def check_raw_size(width: int, height: int, size: int, *, field: str = "image.raw") -> None:
    """A `pony.v1.RawImage`'s shape: width and height positive, `size` (len(pixels)) == width * height * 3.
    InvalidArgument naming `field.width`, `field.height` or `field.pixels` otherwise."""
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            raise InvalidArgument(f"{field}.{name}", f"must be positive, got {value}")
    if size != width * height * 3:
        raise InvalidArgument(
            f"{field}.pixels",
            f"{size} bytes for {width}x{height} RGB; expected width * height * 3 = {width * height * 3}",
        )


def raw_image(
    width: int, height: int, pixels: bytes, *, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Row-major RGB uint8 pixels (a `pony.v1.RawImage`) as a PIL image, no file format parsed. The pixel limit is the
    one `open_image` applies to encoded images; InvalidArgument naming `field.raw.*` for a bad shape."""
    if width * height > max_pixels:
        raise InvalidArgument(field, f"image is {width}x{height}, more than {max_pixels} pixels")
    check_raw_size(width, height, len(pixels), field=f"{field}.raw")
    return Image.frombytes("RGB", (width, height), pixels)


def decode_image(
    data: bytes,
    *,
    field: str = "image",
    formats: Iterable[str] = DEFAULT_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decodes untrusted bytes into an RGB image with EXIF orientation applied (`open_image`, then `load_image`).

    Raises InvalidArgument(field, reason) for empty input, unknown or disallowed formats, images over
    `max_pixels` (decompression bombs are refused before any pixel is decoded) and truncated files.
    """
    return load_image(open_image(data, field=field, formats=formats, max_pixels=max_pixels), field=field)


def encode_png(img: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes, with optional text chunks (e.g. generation parameters)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
