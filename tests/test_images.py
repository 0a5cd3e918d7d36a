"""Decoding untrusted bytes: odd-but-valid images are converted, hostile ones get a reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flowcurate.formats.images import ImageRejected, decode_image
from flowcurate.formats.manifest import EMPTY_FILE, TOO_MANY_PIXELS, TRUNCATED, UNDECODABLE, is_reason


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=40, h=30):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (200, 30, 30)
    a[:, w // 2:] = (30, 30, 200)
    return Image.fromarray(a)


def test_odd_but_valid_images_become_rgb():
    cmyk = decode_image(_bytes(_rgb().convert("CMYK"), "JPEG", quality=95))
    assert cmyk.mode == "CMYK" and cmyk.image.mode == "RGB"
    assert np.abs(np.asarray(cmyk.image, int)[15, 5] - (200, 30, 30)).max() < 25

    a16 = np.full((20, 20), 40000, np.uint16)  # 16-bit: scaled to 40000/257 ~ 156, not clipped to 255
    d16 = decode_image(_bytes(Image.fromarray(a16), "PNG"))
    assert d16.image.mode == "RGB" and abs(int(np.asarray(d16.image)[0, 0, 0]) - 156) <= 1

    pal = Image.new("P", (10, 10))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 5, 10))
    dp = decode_image(_bytes(pal, "PNG", transparency=0))  # index 0 transparent -> white
    px = np.asarray(dp.image)
    assert tuple(px[0, 0]) == (0, 0, 255) and tuple(px[0, 9]) == (255, 255, 255)

    rgba = Image.new("RGBA", (8, 8), (0, 255, 0, 0))
    assert tuple(np.asarray(decode_image(_bytes(rgba, "PNG")).image)[0, 0]) == (255, 255, 255)

    webp = decode_image(_bytes(_rgb(), "WEBP"))
    assert webp.format == "WEBP" and (webp.width, webp.height) == (40, 30)

    png_named_jpg = _bytes(_rgb(), "PNG")  # the name lies; the content decides
    assert decode_image(png_named_jpg).format == "PNG"


def test_exif_rotation_is_applied():
    img = _rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    d = decode_image(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert (d.width, d.height) == (30, 40)
    px = np.asarray(d.image, int)
    assert px[2, 15, 0] > 150 and px[-3, 15, 2] > 150  # the red left half is now on top


def _png_header_only(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,reason", [
    (b"", EMPTY_FILE),
    (b"definitely not an image" * 10, UNDECODABLE),
    (_bytes(_rgb(200, 200), "JPEG")[:800], TRUNCATED),
    (_png_header_only(100_000, 100_000), TOO_MANY_PIXELS),
])
def test_hostile_inputs_get_reasons(data, reason):
    with pytest.raises(ImageRejected) as e:
        decode_image(data)
    assert e.value.reason == reason and is_reason(e.value.reason)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageRejected, match=TOO_MANY_PIXELS):
        decode_image(_bytes(_rgb(100, 100), "PNG"), max_pixels=5000)
    assert decode_image(_bytes(_rgb(100, 100), "PNG"), max_pixels=10_000).width == 100


def test_reason_vocabulary():
    assert is_reason("filtered:reference") and not is_reason("filtered:") and not is_reason("broken")
