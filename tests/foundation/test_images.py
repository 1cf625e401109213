"""Safe image decoding: truncated files, random bytes and decompression bombs are refused with clear errors."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pony_common.errors import InvalidArgument
from pony_common.images import decode_image, encode_png, image_id


def png(size: tuple[int, int] = (32, 24), color: tuple[int, ...] = (200, 10, 10), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_valid_png_decodes_to_rgb() -> None:
    img = decode_image(png(mode="RGBA", color=(0, 0, 255, 255)))
    assert img.mode == "RGB"
    assert img.size == (32, 24)
    assert img.getpixel((0, 0)) == (0, 0, 255)


def test_truncated_png_is_rejected() -> None:
    data = png((256, 256))
    with pytest.raises(InvalidArgument) as err:
        decode_image(data[: len(data) // 2], field="items[0].image")
    assert err.value.field == "items[0].image"
    assert "truncated" in err.value.message or "cannot read" in err.value.message


def test_random_bytes_are_rejected() -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_image(bytes(range(256)) * 8)
    assert "not a decodable image" in err.value.message


def test_empty_input_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="empty image"):
        decode_image(b"")


def test_decompression_bomb_is_rejected_before_decoding() -> None:
    # A 10000x10000 PNG compresses to a few KB; it must be refused on its header.
    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buf, format="PNG", optimize=True)
    with pytest.raises(InvalidArgument) as err:
        decode_image(buf.getvalue(), max_pixels=1_000_000)
    assert "pixels" in err.value.message


def test_disallowed_format_is_rejected() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(InvalidArgument, match="not a decodable image"):
        decode_image(buf.getvalue())


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_content_hash_id_and_png_text_round_trip() -> None:
    data = encode_png(Image.new("RGB", (4, 4)), {"parameters": "score_9, a pony"})
    assert image_id(data) == image_id(bytes(data)) and len(image_id(data)) == 64
    assert Image.open(io.BytesIO(data)).text["parameters"] == "score_9, a pony"
