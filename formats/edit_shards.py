"""Editing shards: the format of instruction-based image editing data (InstructPix2Pix triplets: a
source image, an instruction, the edited image), a format of its own beside the text-to-image shards
of `formats/shards.py`, whose byte-level conventions (npy, deterministic tars, record) it reuses.

docs/architecture.md ("Editing shards") explains it. In short, per sample:

- `latent_mean.npy`, `latent_logvar.npy`: the *edited* image's posterior (the target), as in a
  text-to-image shard; `source_latent_mean.npy`, `source_latent_logvar.npy`: the source image's,
  same crop and resolution;
- `orig.{clip_l,clip_l_pooled,clip_g,clip_g_pooled,t5}.npy`: the instruction's three encodings, in
  the `orig` slot (there is no synthetic variant: no `syn` members);
- `json`: `{"task": "edit", "format_version": EDIT_FORMAT_VERSION, "key", "instruction", "source",
  "width", "height", "crop", "resolution", "conditioning", ...}`.

`OUT/shards/index.json` and `OUT/conditioning.json` carry `"task": "edit"`, so the text-to-image
trainer refuses editing data (`formats.shards.check_task`) and the editing trainer refuses
text-to-image data (`check_edit_sample`, `read_index(..., task=TASK)`). The record is the
text-to-image record (same fields, same `format_version`) plus `task`.

Writers: the pipeline (`flowcurate run --task edit`: pipeline/pass2.py and write.py) and
`models/tiny/edit_triplets.py` (procedural triplets through the real tiny AE and text encoders) call
`encode_edit_sample` and the record and index writers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from flowcurate.formats import shards as S
from flowcurate.formats.files import write_atomic

TASK = "edit"
EDIT_FORMAT_VERSION = 1  # the editing sample and index format's own version (the record keeps S.FORMAT_VERSION)
VARIANT = "orig"  # the instruction's slot
SOURCE_MEMBERS = ("source_latent_mean.npy", "source_latent_logvar.npy")


def edit_array_members() -> list[str]:
    """Every `.npy` member of an editing sample, sorted (tar order)."""
    return sorted([*S.LATENT_MEMBERS, *SOURCE_MEMBERS, *(f"{VARIANT}.{p}.npy" for p in S.PARTS)])


def encode_edit_sample(key: str, latent_mean: np.ndarray, latent_logvar: np.ndarray, source_mean: np.ndarray,
                       source_logvar: np.ndarray, instruction: Mapping[str, np.ndarray], meta: Mapping,
                       conditioning: str, dtype: str = "float16") -> dict[str, bytes]:
    """One editing sample's tar members. Latents (C, h, w) without the batch axis: the edited image's
    posterior (`latent_*`) and the source image's (`source_*`); `instruction[part]` the instruction's
    encodings without the batch axis; `meta`: `instruction` (the text), `source` (where the triplet
    came from), `width`, `height`, `crop`, `resolution`, optionally `answer` (what a checkable edit
    should do, procedural data only)."""
    if "instruction" not in meta:
        raise S.ShardFormatError(f"{key}: an editing sample needs its instruction text in meta")
    out = {"__key__": key, "latent_mean.npy": S.npy_bytes(latent_mean, dtype),
           "latent_logvar.npy": S.npy_bytes(latent_logvar, dtype),
           "source_latent_mean.npy": S.npy_bytes(source_mean, dtype),
           "source_latent_logvar.npy": S.npy_bytes(source_logvar, dtype)}
    for p in S.PARTS:
        out[f"{VARIANT}.{p}.npy"] = S.npy_bytes(instruction[p], dtype)
    doc = {"task": TASK, "format_version": EDIT_FORMAT_VERSION, "key": key, **meta, "conditioning": conditioning}
    out["json"] = json.dumps(doc, sort_keys=True).encode()
    return out


def check_edit_sample(sample: Mapping, record: S.Conditioning) -> dict:
    """Validate one raw editing sample (member name -> bytes) against the record; return its json.
    Raises ShardFormatError naming the shard, the key and what differs (a text-to-image sample too)."""
    where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
    if "json" not in sample:
        raise S.ShardFormatError(f"{where}: no json member")
    doc = json.loads(sample["json"])
    S.check_task(doc, where, TASK)
    if doc.get("format_version") != EDIT_FORMAT_VERSION:
        raise S.ShardFormatError(f"{where}: editing format_version {doc.get('format_version')} != "
                                 f"{EDIT_FORMAT_VERSION}")
    if doc.get("conditioning") != record.hash:
        raise S.ShardFormatError(f"{where}: made with conditioning {doc.get('conditioning')}, but the run's "
                                 f"conditioning record {record.path} is {record.hash}")
    missing = [m for m in edit_array_members() if m not in sample]
    if missing:
        raise S.ShardFormatError(f"{where}: missing members {missing}")
    return doc


def check_edit_arrays(arrays: Mapping[str, np.ndarray], doc: Mapping, record: S.Conditioning, where: str = "") -> None:
    """Shapes and dtype of decoded members against the record (the source latents as the edited ones)."""
    shapes = S.expected_shapes(record.json, doc["resolution"])
    for m in SOURCE_MEMBERS:
        shapes[m] = shapes["latent_mean.npy"]
    for name, shape in shapes.items():
        if name not in arrays:
            continue
        a = arrays[name]
        if tuple(a.shape) != shape or a.dtype != np.dtype(record.json["store_dtype"]):
            raise S.ShardFormatError(f"{where}#{doc['key']}: {name} is {a.dtype}{list(a.shape)}, the conditioning "
                                     f"record says {record.json['store_dtype']}{list(shape)}")


def write_edit_record(out_dir: Path, doc: dict, arrays: Mapping[str, np.ndarray]) -> S.Conditioning:
    """The conditioning record (`models.conditioning.record_parts`' doc and arrays) marked as editing's."""
    return S.write_record(out_dir, {**doc, "task": TASK}, arrays)


def edit_index_doc(counts: Mapping[str, int], conditioning: str) -> dict:
    """`formats.shards.index_doc` (shards, splits, counts, the wids description) marked as editing's."""
    return {**S.index_doc(counts, conditioning), "task": TASK, "format_version": EDIT_FORMAT_VERSION}


def write_edit_index(shards_dir: Path, counts: Mapping[str, int], conditioning: str) -> dict:
    doc = edit_index_doc(counts, conditioning)
    write_atomic(Path(shards_dir) / S.INDEX_JSON, S.record_bytes(doc))
    return doc


def read_edit_index(shards_dir: Path) -> dict:
    path = Path(shards_dir) / S.INDEX_JSON
    if not path.is_file():
        raise S.ShardFormatError(f"no {S.INDEX_JSON} in {shards_dir}")
    doc = json.loads(path.read_text())
    S.check_task(doc, str(path), TASK)
    if doc.get("format_version") != EDIT_FORMAT_VERSION:
        raise S.ShardFormatError(f"{path}: editing format_version {doc.get('format_version')} != {EDIT_FORMAT_VERSION}")
    return doc
