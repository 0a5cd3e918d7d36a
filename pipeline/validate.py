"""Validation of one raw image: bytes -> the training-resolution RGB array and what the manifest records,
or `ImageRejected` with a reason from the vocabulary. A pure function (no Beam), tested alone.

Order: decode with the pixel limit, EXIF transpose and mode conversion (`flowcurate.formats.images.decode_image`:
CMYK, 16-bit (scaled), palette, alpha -> RGB); minimum size (shorter side); maximum aspect ratio; then
the largest centred crop with the target's aspect ratio, resized to the target (SD3: square at the
training resolution, or with `buckets` the aspect bucket nearest to the image's own aspect ratio). The
crop box is reported in the original (EXIF-corrected) pixels, as the sample json wants it.
`pixel_hash` is the sha256 of the decoded original's pixels and size: the exact-duplicate key.

`validate_pair` does the same for an edit triplet's two images: the edited image is validated as
above and the source is cut with the *same* box and resized to the same size, so the two stay aligned
pixel for pixel (the editing model learns where things moved). Both must have the same size
(`edit_size_mismatch`) and differ somewhere (`edit_unchanged`); the pair's `pixel_hash` covers both.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from flowcurate.formats.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from flowcurate.formats.manifest import BAD_ASPECT, EDIT_SIZE_MISMATCH, EDIT_UNCHANGED, TOO_SMALL
from flowcurate.models.sscd import SSCDPreprocess

# sides of the resized image are multiples of this: the AE downsamples 8x, the MM-DiT patches 2x2
SIDE_MULTIPLE = 16


@dataclass(frozen=True)
class Valid:
    image: np.ndarray  # (H, W, 3) uint8 at `resolution`
    width: int  # the original after EXIF transpose
    height: int
    crop: tuple[int, int, int, int]  # left, top, right, bottom in the original's pixels
    resolution: tuple[int, int]  # (H, W) of `image`
    pixel_hash: str  # "sha256:..." of the decoded original (exact-duplicate detection)
    mode: str  # the original's mode, e.g. "CMYK"
    sscd: np.ndarray | None = None  # (S, S, 3) uint8 for SSCD (square): the whole original, or the training crop
    source: np.ndarray | None = None  # edit triplets (`validate_pair`): the source image cut like `image`


def aspect_buckets(resolution: int, max_aspect: float = 3.0, multiple: int = SIDE_MULTIPLE) -> list[tuple[int, int]]:
    """(H, W) buckets of about resolution^2 pixels, sides multiples of `multiple`, aspect <= max_aspect,
    from the tallest to the widest; always includes the square."""
    out = set()
    for w in range(multiple, int(resolution * math.sqrt(max_aspect)) + multiple, multiple):
        h = int(round(resolution * resolution / w / multiple)) * multiple
        if h >= multiple and max(w, h) / min(w, h) <= max_aspect + 1e-9:
            out.add((h, w))
    out.add((resolution, resolution))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest in log space (ties: the squarer one)."""
    a = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - a), abs(math.log(hw[1] / hw[0]))))


def centre_crop_box(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """The largest centred box of the target's aspect ratio inside a width x height image."""
    if width * target_h > height * target_w:  # wider than the target: crop the sides
        cw, ch = max(1, round(height * target_w / target_h)), height
    else:
        cw, ch = width, max(1, round(width * target_h / target_w))
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def pixel_hash(img: Image.Image) -> str:
    h = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return "sha256:" + h.hexdigest()


def training_view(img: Image.Image, box: tuple[int, int, int, int], resolution: tuple[int, int]) -> np.ndarray:
    """`box` of `img` resized to `resolution` (H, W): uint8 (H, W, 3). One resampling for every view, so
    an edit triplet's two images, cut with one box, stay aligned."""
    th, tw = resolution
    return np.asarray(img.resize((tw, th), Image.Resampling.BICUBIC, box=box, reducing_gap=None), dtype=np.uint8)


def validate(data: bytes, *, resolution: int = 256, min_size: int = 64, max_aspect: float = 3.0,
             max_pixels: int = DEFAULT_MAX_PIXELS, buckets: list[tuple[int, int]] | None = None,
             sscd: SSCDPreprocess | None = None, sscd_crop: bool = False) -> Valid:
    """Raw image bytes -> `Valid`, or raise `ImageRejected` (reason from the vocabulary). With `sscd`,
    also the EXIF-corrected original resized for the SSCD model (`SSCDPreprocess.resize`), made here
    while the decoded original is at hand, so no later stage decodes the bytes again. With
    `sscd_crop`, the training crop (the `crop` box, before the resize) instead: the view that the
    memorization check compares generated images with."""
    d = decode_image(data, max_pixels)
    w, h = d.width, d.height
    if min(w, h) < min_size:
        raise ImageRejected(TOO_SMALL, f"{w}x{h}: shorter side < {min_size}")
    if max(w, h) / min(w, h) > max_aspect:
        raise ImageRejected(BAD_ASPECT, f"{w}x{h}: aspect ratio {max(w, h) / min(w, h):.2f} > {max_aspect}")
    th, tw = nearest_bucket(w, h, buckets) if buckets else (resolution, resolution)
    box = centre_crop_box(w, h, th, tw)
    return Valid(training_view(d.image, box, (th, tw)), w, h, box, (th, tw), pixel_hash(d.image), d.mode,
                 None if sscd is None else sscd.resize(d.image.crop(box) if sscd_crop else d.image))


def validate_pair(source: bytes, edited: bytes, **kw) -> Valid:
    """An edit triplet's (source, edited) image bytes -> the edited image's `Valid` with `source`, the
    source cut with the same box, or raise `ImageRejected`. `kw` as `validate` (SSCD pixels, if asked
    for, are the edited image's). `pixel_hash` is the pair's (both images), so a re-read checks both."""
    target = validate(edited, **kw)
    d = decode_image(source, kw.get("max_pixels", DEFAULT_MAX_PIXELS))
    if (d.width, d.height) != (target.width, target.height):
        raise ImageRejected(EDIT_SIZE_MISMATCH, f"source {d.width}x{d.height}, edited {target.width}x{target.height}")
    src_hash = pixel_hash(d.image)
    if src_hash == target.pixel_hash:
        raise ImageRejected(EDIT_UNCHANGED, "the edited image equals the source, pixel for pixel")
    pair = "sha256:" + hashlib.sha256(f"{target.pixel_hash}:{src_hash}".encode()).hexdigest()
    return replace(target, pixel_hash=pair, source=training_view(d.image, target.crop, target.resolution))
