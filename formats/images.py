"""Decoding untrusted image bytes into RGB, with a rejection reason (`formats/manifest.py`) when it fails;
encoding a training view for the "images" output (`encode_view`).

Shared by every stage that reads images (pipeline validation, `flowcurate dedup`, memorization), so
one bad file gets the same verdict everywhere. Odd but valid images are converted, not rejected:
EXIF rotation is applied, CMYK / palette / greyscale become RGB, alpha is composited on white, and
16-bit data is scaled to 8 bits (not clipped).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowcurate.formats.manifest import EMPTY_FILE, TOO_MANY_PIXELS, TRUNCATED, UNDECODABLE, is_reason

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit


class ImageRejected(Exception):
    """An input that cannot become an RGB image; `reason` is from the rejection vocabulary."""

    def __init__(self, reason: str, detail: str = ""):
        assert is_reason(reason), reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied
    width: int  # after EXIF transpose
    height: int
    mode: str  # the original mode, e.g. "CMYK", "I;16", "P"
    format: str | None  # "JPEG", "PNG", ...


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PIL gives "I" for 16-bit PNGs): scale, never clip
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if a.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        a = np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=1.0))
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Bytes -> `Decoded` RGB image, or raise `ImageRejected` with a vocabulary reason."""
    if not data:
        raise ImageRejected(EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: check the pixel count before decoding anything
            if w * h > max_pixels:
                raise ImageRejected(TOO_MANY_PIXELS, f"{w}x{h} > {max_pixels} pixels")
            mode, fmt = img.mode, img.format
            img.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(TOO_MANY_PIXELS, str(e)) from None
    except UnidentifiedImageError as e:
        raise ImageRejected(UNDECODABLE, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = TRUNCATED if "truncat" in str(e).lower() or isinstance(e, EOFError) else UNDECODABLE
        raise ImageRejected(reason, str(e)) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost the image; keep it unrotated
        pass
    rgb = _to_rgb(img)
    return Decoded(rgb, rgb.width, rgb.height, mode, fmt)


# PIL format -> the file extension img2dataset and webdataset's decoders use
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
              "MPO": "jpg", "JPEG2000": "jp2", "ICO": "ico", "PPM": "ppm"}


def image_extension(data: bytes) -> str:
    """The extension of an image's own bytes, from its header (`img` when PIL names no usual one)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return EXTENSIONS.get(img.format or "", "img")
    except Exception:  # noqa: BLE001  (only decodable images get here; be safe anyway)
        return "img"


def encode_view(image, ext: str, quality: int = 95) -> bytes:
    """An (H, W, 3) uint8 array as `jpg` (baseline, 4:2:0 at `quality`) or `png` bytes; the same array
    gives the same bytes (PIL writes no timestamps)."""
    buf = io.BytesIO()
    img = Image.fromarray(image, "RGB")
    if ext == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    elif ext == "png":
        img.save(buf, format="PNG")
    else:
        raise ValueError(f"view format {ext!r}: jpg or png")
    return buf.getvalue()
