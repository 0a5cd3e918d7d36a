"""pipeline/validate.py: the pure validation function (decode, size and aspect checks, centred crop to
the training resolution or the nearest aspect bucket, exact-duplicate pixel hash)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flowcurate.formats.images import ImageRejected
from flowcurate.pipeline.validate import aspect_buckets, centre_crop_box, nearest_bucket, validate


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def test_square_centre_crop_of_a_wide_image():
    v = validate(encode(halves(200, 100)), resolution=64, min_size=32)
    assert v.image.shape == (64, 64, 3) and v.image.dtype == np.uint8
    assert (v.width, v.height) == (200, 100) and v.crop == (50, 0, 150, 100) and v.resolution == (64, 64)
    left, right = v.image[:, :28].mean(axis=(0, 1)), v.image[:, 36:].mean(axis=(0, 1))
    assert left[0] > 250 and left[2] < 5 and right[2] > 250 and right[0] < 5  # both halves, centred


def test_tall_image_is_cropped_top_and_bottom():
    assert centre_crop_box(100, 300, 64, 64) == (0, 100, 100, 200)
    assert centre_crop_box(640, 480, 256, 256) == (80, 0, 560, 480)  # the sample json example in docs/architecture.md


def test_aspect_buckets_and_nearest():
    b = aspect_buckets(256, max_aspect=3.0)
    assert (256, 256) in b
    for h, w in b:
        assert h % 16 == 0 and w % 16 == 0 and max(h, w) / min(h, w) <= 3.0
        assert 0.8 < h * w / 256**2 < 1.25
    assert nearest_bucket(640, 480, b)[1] > nearest_bucket(640, 480, b)[0]  # landscape -> wide bucket
    assert nearest_bucket(300, 300, b) == (256, 256)
    v = validate(encode(halves(300, 150)), resolution=256, min_size=32, buckets=b)
    h, w = v.resolution
    assert v.image.shape == (h, w, 3) and 1.8 < w / h < 2.2


@pytest.mark.parametrize("size, kw, reason", [
    ((20, 100), {}, "too_small"),
    ((400, 100), {"max_aspect": 3.0}, "bad_aspect"),
    ((300, 300), {"max_pixels": 300 * 300 - 1}, "too_many_pixels"),
])
def test_rejections_carry_vocabulary_reasons(size, kw, reason):
    with pytest.raises(ImageRejected) as e:
        validate(encode(halves(*size)), resolution=64, min_size=32, **kw)
    assert e.value.reason == reason


def test_broken_bytes_are_rejected():
    good = encode(halves(64, 64), "JPEG")
    for data, reason in ((b"", "empty_file"), (b"not an image", "undecodable"), (good[: len(good) // 2], "truncated")):
        with pytest.raises(ImageRejected) as e:
            validate(data, resolution=32, min_size=16)
        assert e.value.reason == reason


def test_odd_modes_and_exif_rotation_are_converted():
    cmyk = validate(encode(halves(64, 48).convert("CMYK"), "JPEG"), resolution=32, min_size=16)
    assert cmyk.mode == "CMYK" and cmyk.image.shape == (32, 32, 3)
    deep = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    assert deep.mode == "I;16"
    v16 = validate(encode(deep), resolution=32, min_size=16)
    assert v16.image.max() > 200  # scaled from 16 bits, not clipped to 255 of 65535
    img = halves(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = validate(encode(img, "JPEG", exif=exif), resolution=32, min_size=16)
    assert (rotated.width, rotated.height) == (40, 80)


def test_pixel_hash_identifies_identical_pixels_only():
    img = halves(96, 64)
    a = validate(encode(img, "PNG", compress_level=1), resolution=32, min_size=16)
    b = validate(encode(img, "PNG", compress_level=9), resolution=32, min_size=16)
    c = validate(encode(img, "JPEG", quality=70), resolution=32, min_size=16)
    assert a.pixel_hash == b.pixel_hash != c.pixel_hash
    assert validate(encode(img), resolution=32, min_size=16).image.tobytes() == a.image.tobytes()
