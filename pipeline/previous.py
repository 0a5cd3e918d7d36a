"""Earlier curated outputs (`flowcurate run --previous OUT`): what a new run is curated against.

An earlier output's kept items are read from its manifest (key, sizes) and embeddings (SSCD
descriptors), never recomputed, and join the new run's near-duplicate search as items that are
always kept and come first in the keep rule: a new input that duplicates one of them becomes a
`duplicate` row naming it (and, in the `previous` column, its output). A new input whose key an
earlier output already holds is rejected as `duplicate_key`. New shards are numbered after the
earlier outputs' shards, so their names never collide.
"""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from flowcurate.formats.shards import INDEX_JSON, SPLITS
from flowcurate.pipeline.records import Item
from flowcurate.pipeline.write import STATS_JSON, join, read_file

PREVIOUS = "previous"  # the marker reason of an earlier output's key in the key grouping (never a row)


def previous_id(out_index: int, part: int, row: int) -> int:
    """A negative id (new inputs' ids are >= 0): the earlier output, its manifest part, the row."""
    return -1 - ((out_index << 56) | (part << 32) | row)


def shard_base(outs: list[str]) -> dict[str, int]:
    """split -> the first shard number free after every earlier output's shards of that split."""
    base = dict.fromkeys(SPLITS, 0)
    for out in outs:
        doc = json.loads(read_file(join(out, "shards", INDEX_JSON)))
        for s in doc["shards"]:
            split, number = s["name"].removesuffix(".tar").split("-", 1)
            base[split] = max(base[split], int(number) + 1)
    return base


def check_compatible(outs: list[str], sscd: dict) -> None:
    """Earlier descriptors must come from the same SSCD model and preprocessing as ours."""
    for out in outs:
        theirs = json.loads(read_file(join(out, STATS_JSON))).get("sscd", {})
        if theirs.get("preprocess") != json.loads(json.dumps(sscd["preprocess"])):
            raise ValueError(f"--previous {out}: its SSCD preprocessing {theirs.get('preprocess')} differs from "
                             f"this run's {sscd['preprocess']}: descriptors would not be comparable")


def _parts(element):
    index, out = element
    for what in ("manifest", "embeddings"):
        paths = sorted(m.path for m in FileSystems.match([join(out, what, "*.parquet")])[0].metadata_list)
        if what == "manifest" and not paths:
            raise ValueError(f"--previous {out}: no manifest (is it a flowcurate run output?)")
        for j, path in enumerate(paths):
            yield index, out, what, j, path


def _read_part(element):
    import pyarrow.parquet as pq

    index, out, what, j, path = element
    with FileSystems.open(path) as fh:
        pf = pq.ParquetFile(fh)
        columns = ["key", "status", "width", "height"] if what == "manifest" else ["key", "embedding"]
        row = 0
        for g in range(pf.num_row_groups):
            for r in pf.read_row_group(g, columns=columns).to_pylist():
                if what == "embeddings":
                    yield (index, r["key"]), ("e", np.asarray(r["embedding"], np.float32).tobytes())
                elif r["status"] == "kept":
                    yield (index, r["key"]), ("m", previous_id(index, j, row), out, r["width"], r["height"])
                row += 1


def _kept_with_embedding(kv):
    (_, key), values = kv
    m = [v for v in values if v[0] == "m"]
    e = [v for v in values if v[0] == "e"]
    if m and e:
        _, id_, out, w, h = m[0]
        yield Item(id_, key, out, PREVIOUS, w or 0, h or 0, embedding=e[0][1])


class ReadPrevious(beam.PTransform):
    """Earlier output folders -> one `Item` per kept item (negative id, reason `previous`, source = its
    output folder, its SSCD descriptor)."""

    def __init__(self, outs: list[str]):
        super().__init__()
        self.outs = [o.rstrip("/") for o in outs]

    def expand(self, pbegin):
        return (pbegin
                | "Outputs" >> beam.Create(list(enumerate(self.outs)))
                | "Parts" >> beam.FlatMap(_parts)
                | "SpreadParts" >> beam.Reshuffle()
                | "ReadParts" >> beam.FlatMap(_read_part)
                | "ByKey" >> beam.GroupByKey()
                | "Kept" >> beam.FlatMap(_kept_with_embedding))
