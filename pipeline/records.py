"""The pipeline's records: one flat, named record per phase.

    pass 1   Item      one per input: what reading, validation, the filters and SSCD found
    decide   Kept      one per kept input: where pass 2 finds it again and what it becomes
    any      manifest rows (dicts, `manifest_row`), one per input in the end

No record holds pixels or image bytes: records are what crosses the graph's shuffles, so a shuffle's
size does not depend on the images' resolution. Pixels live only inside a pass, one chunk at a time.
An input is identified by `id = file_index << 32 | ordinal` (its file's place in the sorted input list
and its place in that file's reading order): unique, compact, the same on every rerun.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flowcurate.formats.manifest import MANIFEST_SCHEMA, SCORE_PREFIX, score_column

MANIFEST_FIELDS = tuple(MANIFEST_SCHEMA.names)
ORDINAL_BITS = 32


def item_id(file_index: int, ordinal: int) -> int:
    return (file_index << ORDINAL_BITS) | ordinal


def file_index_of(id_: int) -> int:
    return id_ >> ORDINAL_BITS


def ordinal_of(id_: int) -> int:
    return id_ & ((1 << ORDINAL_BITS) - 1)


class Item(NamedTuple):
    """Pass 1's record of one input."""

    id: int
    key: str  # sanitised key as read (repeated keys are numbered later, by `decide`)
    source: str  # "uri#member" (tar), "uri" (image file), "uri#row" (Parquet): enough to find it again
    reason: str | None = None  # rejected in pass 1 (rejection vocabulary), else None
    width: int | None = None  # after EXIF transpose
    height: int | None = None
    crop: tuple[int, int, int, int] | None = None  # left, top, right, bottom in the original's pixels
    pixel_hash: str | None = None  # exact-duplicate key
    embedding: bytes | None = None  # SSCD descriptor, float32 raw bytes (compact in shuffles)
    caption: str | None = None  # the original caption (alt text)
    # (filter name, score) in filter order; None: not scored (a clip_score without a caption)
    scores: tuple[tuple[str, float | None], ...] = ()

    @property
    def pixels(self) -> float:
        return float((self.width or 0) * (self.height or 0))

    def vector(self) -> np.ndarray:
        return np.frombuffer(self.embedding, dtype=np.float32)


class Kept(NamedTuple):
    """A kept input on its way to pass 2: re-read by `id` from its file, checked against `pixel_hash`."""

    id: int
    key: str  # the final key (unique)
    source: str
    pixel_hash: str
    width: int
    height: int
    cluster: int | None  # top-1 k-means cluster
    split: str  # "train" or "val"
    scores: tuple[tuple[str, float | None], ...] = ()  # pass 1's filter scores, for the kept row


# pass 1's records of one input file, as kept for a rerun (OUT/.pass1/...): ordinals, not ids, since
# a file's index in the input list may differ between runs
ITEMS_SCHEMA = pa.schema([
    ("ordinal", pa.int64()), ("key", pa.string()), ("source", pa.string()), ("reason", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("crop", pa.list_(pa.int32())), ("pixel_hash", pa.string()),
    ("embedding", pa.binary()), ("caption", pa.string()), ("score_names", pa.list_(pa.string())),
    ("score_values", pa.list_(pa.float64())),
])


def items_to_parquet(items: list[Item]) -> bytes:
    rows = [{"ordinal": ordinal_of(it.id), "key": it.key, "source": it.source, "reason": it.reason,
             "width": it.width, "height": it.height, "crop": list(it.crop) if it.crop else None,
             "pixel_hash": it.pixel_hash, "embedding": it.embedding, "caption": it.caption,
             "score_names": [n for n, _ in it.scores], "score_values": [s for _, s in it.scores]} for it in items]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA), buf)
    return buf.getvalue()


def items_from_parquet(data: bytes, file_index: int) -> list[Item]:
    out = []
    for r in pq.read_table(io.BytesIO(data)).to_pylist():
        out.append(Item(item_id(file_index, r["ordinal"]), r["key"], r["source"], r["reason"], r["width"],
                        r["height"], tuple(r["crop"]) if r["crop"] is not None else None, r["pixel_hash"],
                        r["embedding"], r["caption"], tuple(zip(r["score_names"], r["score_values"]))))
    return out


def manifest_row(key: str, source: str, status: str, scores=(), **fields) -> dict:
    """A manifest row with every column (None where not given); `scores`: (filter name, score) pairs
    (`Item.scores`), each in its column `score_<name>`; `fields` may name score columns directly."""
    row = dict.fromkeys(MANIFEST_FIELDS)
    row.update({"key": key, "source": source, "status": status, "notes": [], **fields})
    unknown = {f for f in set(row) - set(MANIFEST_FIELDS) if not f.startswith(SCORE_PREFIX)}
    if unknown:
        raise ValueError(f"unknown manifest fields {sorted(unknown)}")
    for name, value in scores:
        row[score_column(name)] = value
    return row


def with_score_columns(row: dict, columns: tuple[str, ...]) -> dict:
    """The row with every score column of the run (None where its filter did not score it)."""
    return {**row, **{c: row.get(c) for c in columns}}


def rejected_row(item: Item, reason: str | None = None, key: str | None = None) -> dict:
    """The rejected row of a pass-1 item (sizes where they are known)."""
    return manifest_row(key or item.key, item.source, "rejected", reason=reason or item.reason,
                        width=item.width, height=item.height, scores=item.scores)
