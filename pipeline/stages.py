"""Beam stages after reading: validation and exact-duplicate removal, with manifest rows for every
input that stops here (the manifest has exactly one row per input: docs/architecture.md "Manifest").

- `Validate`: `flowcurate.pipeline.validate.validate` per item; rejections become manifest rows with the
  vocabulary reason; survivors carry the resized image, sizes, crop and pixel hash.
- `ExactDedup`: groups survivors by the hash of their decoded pixels; in each group the item first in
  priority order (more pixels, then key; equal pixels make it the smallest key) is kept and the others
  become `duplicate` rows with `similarity` 1.0 and `duplicate_of` the kept key.
Both are deterministic whatever the runner, the worker count or the arrival order.
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
import numpy as np

from flowcurate.formats.images import ImageRejected
from flowcurate.formats.manifest import FAILED_PREFIX
from flowcurate.pipeline.chunks import Chunk
from flowcurate.pipeline.read import RawItem
from flowcurate.pipeline.validate import validate

MANIFEST_FIELDS = ("key", "source", "status", "reason", "duplicate_of", "similarity", "cluster", "width", "height",
                   "caption_original", "caption_synthetic", "notes", "shard")


def manifest_row(key: str, source: str, status: str, **fields) -> dict:
    row = dict.fromkeys(MANIFEST_FIELDS)
    row.update({"key": key, "source": source, "status": status, "notes": [], **fields})
    unknown = set(row) - set(MANIFEST_FIELDS)
    if unknown:
        raise ValueError(f"unknown manifest fields {sorted(unknown)}")
    return row


def failed_rows(stage: str, sizes: bool = False):
    """A RunInference dead letter (failed batch, error) -> a `failed:<stage>` rejected row for every
    item the batch held (with width and height when `sizes`)."""
    def rows(dead):
        batch, _error = dead
        for element in (batch if isinstance(batch, list) else [batch]):
            for it in _chunk_items(element):
                a = _accepted(it)
                extra = {"width": a.width, "height": a.height} if sizes else {}
                yield manifest_row(a.key, a.source, "rejected", reason=f"{FAILED_PREFIX}{stage}", **extra)
    return rows


def _chunk_items(element) -> list:
    if not isinstance(element, Chunk) and isinstance(element, tuple):
        element = element[0]  # keyed handlers get (chunk, payload)
    return element.items if isinstance(element, Chunk) else [element]


def _accepted(x):
    """The `Accepted` inside any stage's element."""
    for attr in ("captioned", "kept", "item"):
        while hasattr(x, attr):
            x = getattr(x, attr)
    return x


class Accepted(NamedTuple):
    key: str
    source: str
    caption: str | None
    image: np.ndarray  # (H, W, 3) uint8 at the training resolution
    width: int
    height: int
    crop: tuple[int, int, int, int]
    resolution: tuple[int, int]
    pixel_hash: str
    sscd: np.ndarray | None = None  # (S, S, 3) uint8 for the SSCD model; dropped once embedded


class Validate(beam.DoFn):
    """RawItem -> Accepted (main output) or a manifest row (tagged 'rejected')."""

    REJECTED = "rejected"

    def __init__(self, resolution: int, min_size: int, max_aspect: float, max_pixels: int, buckets=None,
                 sscd=None):
        self.kw = dict(resolution=resolution, min_size=min_size, max_aspect=max_aspect, max_pixels=max_pixels,
                       buckets=buckets, sscd=sscd)
        self.rejected = beam.metrics.Metrics.counter("flowcurate", "rejected")

    def process(self, item: RawItem):
        if item.reason is not None:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, manifest_row(item.key, item.source, "rejected",
                                                                       reason=item.reason))
            return
        try:
            v = validate(item.image, **self.kw)
        except ImageRejected as e:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, manifest_row(item.key, item.source, "rejected",
                                                                       reason=e.reason))
            return
        yield Accepted(item.key, item.source, item.caption, v.image, v.width, v.height, v.crop, v.resolution,
                       v.pixel_hash, v.sscd)


def _resolve_exact(group: tuple[str, list[Accepted]]):
    _, items = group
    items = sorted(items, key=lambda a: (-a.width * a.height, a.key))
    yield items[0]
    for a in items[1:]:
        yield beam.pvalue.TaggedOutput(ExactDedup.DUPLICATES, manifest_row(
            a.key, a.source, "duplicate", duplicate_of=items[0].key, similarity=1.0, width=a.width,
            height=a.height))


class ExactDedup(beam.PTransform):
    """PCollection[Accepted] -> {'kept': Accepted, 'duplicates': manifest rows}."""

    DUPLICATES = "duplicates"

    def expand(self, accepted):
        return (accepted
                | "ByPixels" >> beam.Map(lambda a: (a.pixel_hash, a))
                | "Group" >> beam.GroupByKey()
                | "Resolve" >> beam.FlatMap(_resolve_exact).with_outputs(self.DUPLICATES, main="kept"))
