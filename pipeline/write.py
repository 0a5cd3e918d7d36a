"""Writing OUT through Beam's FileSystems (local paths, gs://, s3://, ...), each file under a temporary
name and renamed, so a reader never sees half a file:

    OUT/conditioning.json + .npz       the conditioning record, written once per run
    OUT/shards/{train,val}-NNNNNN.tar  curated samples; OUT/shards/index.json, {train,val}.wids.json
    OUT/manifest/part-*.parquet        one row per input
    OUT/embeddings/part-*.parquet      SSCD descriptors of the inputs near-duplicate search saw
    OUT/crop_embeddings/part-*.parquet SSCD descriptors of each kept input's training crop
    OUT/stats.json                     counts per status and reason, and what produced them

Shards are contiguous ranges of the kept inputs in (input file, reading order), `shard_size` each.
Pass 2 streams each input file's samples into part tars, one per (shard, file), under
OUT/.pass2/parts/; a shard made of one part is renamed into place, otherwise its parts are
concatenated in file order. Reruns give byte-identical shards. Beside the parts, OUT/.pass2/ keeps
what pass 2 produced for each finished file (its manifest rows, part list and crop descriptors), so
a killed run started again skips the files whose parts are still there.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from flowcurate.formats import edit_shards
from flowcurate.formats.config import Config
from flowcurate.formats.shards import (
    INDEX_JSON,
    SampleWriter,
    index_doc,
    record_bytes,
    record_files,
    wids_docs,
)

PASS2_DIR = ".pass2"  # pass 2's parts and finished files of the run in progress: what a rerun reuses
STATS_JSON = "stats.json"
RUN_JSON = "run.json"  # what makes a rerun the same run (pipeline/run.py, prepare_output)
PASS1_DIR = ".pass1"  # pass 1's records per input file, per settings hash: what a rerun reuses
CROP_EMBEDDINGS = "crop_embeddings"  # SSCD of each kept input's training crop (memorization)


def join(*parts: str) -> str:
    return FileSystems.join(*parts) if "://" in parts[0] else posixpath.join(*parts)


def write_file(path: str, data: bytes) -> str:
    """Write `data` to `path` under a temporary name, then rename it into place."""
    tmp = _tmp(path)
    with FileSystems.create(tmp) as fh:
        fh.write(data)
    FileSystems.rename([tmp], [path])
    return path


def read_file(path: str) -> bytes:
    with FileSystems.open(path) as fh:
        return fh.read()


def delete_tree(path: str) -> None:
    if FileSystems.exists(path):
        FileSystems.delete([path])


def _tmp(path: str) -> str:
    return join(posixpath.dirname(path) or ".", f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")


class PartWriter:
    """Samples streamed into OUT/.pass2/parts/{shard}/{file_index:09d}.tar (one sample held at a time)."""

    def __init__(self, out: str, shard: str, file_index: int):
        self.shard, self.file_index = shard, file_index
        self.path = join(out, PASS2_DIR, "parts", shard, f"{file_index:09d}.tar")
        self._tmp = _tmp(self.path)
        self._fh = FileSystems.create(self._tmp)
        self._writer = SampleWriter(self._fh)

    @property
    def count(self) -> int:
        return self._writer.count

    def add(self, sample: dict) -> None:
        self._writer.add(sample)

    def close(self) -> tuple[str, tuple[int, str, int]]:
        """Finish the part and rename it into place -> (shard, (file_index, path, samples))."""
        self._writer.close()
        self._fh.close()
        FileSystems.rename([self._tmp], [self.path])
        return self.shard, (self.file_index, self.path, self.count)


def concat_parts(out: str, shard: str, parts: list[str]) -> str:
    """Join part tars (given in file order) into OUT/shards/{shard}; a single part is renamed."""
    path = join(out, "shards", shard)
    if len(parts) == 1:
        if not FileSystems.exists(join(out, "shards")):  # a local rename needs the folder
            try:
                FileSystems.mkdirs(join(out, "shards"))
            except OSError:  # made by another worker meanwhile
                pass
        FileSystems.rename(parts, [path])
        return path
    tmp = _tmp(path)
    with FileSystems.create(tmp) as fh:
        with tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT) as dst:
            for part in parts:
                with FileSystems.open(part) as pf, tarfile.open(fileobj=pf, mode="r|") as src:
                    for info in src:
                        dst.addfile(info, src.extractfile(info))
    FileSystems.rename([tmp], [path])
    FileSystems.delete(parts)
    return path


def write_json(path: str, doc: dict) -> str:
    return write_file(path, (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode())


# ------------------------------------------------------------------------------------------ run outputs

def make_conditioning(_, cfg: Config, label: str | None, out: str) -> str | None:
    """Encode the record (empty + validation prompts) once per run, write it, return its content hash;
    None, loading nothing, when the run writes no "sd3" output (no arrays: nothing to describe)."""
    if "sd3" not in cfg.pipeline.outputs:
        return None
    from flowcurate.models.autoencoder import Autoencoder
    from flowcurate.models.conditioning import record_parts
    from flowcurate.models.text_encoders import TextEncoders, quiet_hf_logging

    m, pc = cfg.models, cfg.pipeline
    quiet_hf_logging()
    ae = Autoencoder.load(m.sd3, revision=m.sd3_revision, dtype=pc.ae_dtype)
    te = TextEncoders.load(m.sd3, revision=m.sd3_revision, t5_length=pc.t5_max_length, dtype=pc.text_encoder_dtype)
    doc, arrays = record_parts(m.sd3, ae, te, revision=m.sd3_revision, store_dtype=pc.store_dtype,
                               validation_prompts=list(pc.validation_prompts), ae_dtype=pc.ae_dtype,
                               te_dtype=pc.text_encoder_dtype, label=label)
    if pc.task == edit_shards.TASK:  # editing shards' record: the editing trainer checks it
        doc = {**doc, "task": edit_shards.TASK}
    _, files, digest = record_files(doc, arrays)
    for name, data in files.items():
        write_file(join(out, name), data)
    return digest


def shard_offsets(counts: list, shard_size: int) -> dict:
    """[((file_index, split), kept)] -> {(file_index, split): position of the file's first kept item in
    its split}: the kept items of a split, in (file, reading order), fill shards of `shard_size`."""
    offsets, running = {}, {}
    for (fi, split), n in sorted(counts):
        offsets[(fi, split)] = running.get(split, 0)
        running[split] = running.get(split, 0) + n
    return offsets


def write_shard(kv, out: str):
    shard, parts = kv
    parts = sorted(parts)
    concat_parts(out, shard, [p for _, p, _ in parts])
    return shard, sum(n for _, _, n in parts)


def write_index(counts: list, out: str, conditioning: str | None, outputs: tuple = ("sd3",), task: str = "t2i") -> dict:
    """OUT/shards/index.json and a wids description per split, OUT/shards/{split}.wids.json; an
    editing run's index says so (`formats/edit_shards.py`)."""
    doc = (edit_shards.edit_index_doc(dict(counts), conditioning) if task == edit_shards.TASK
           else index_doc(dict(counts), conditioning, outputs))
    write_file(join(out, "shards", INDEX_JSON), record_bytes(doc))
    for name, wids in wids_docs(dict(counts)).items():
        write_file(join(out, "shards", name), record_bytes(wids))
    delete_tree(join(out, PASS2_DIR))  # every shard is in place: nothing left to resume
    return doc


def count_row(row: dict) -> dict:
    label = row["status"] if row["status"] != "rejected" else f"rejected:{row['reason']}"
    beam.metrics.Metrics.counter("flowcurate", label).inc()
    return row


def write_stats(counts: list, out: str, info: dict) -> dict:
    by_status: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for (status, reason), n in counts:
        by_status[status] = by_status.get(status, 0) + n
        if reason:
            reasons[reason] = reasons.get(reason, 0) + n
    doc = {**info, "inputs": sum(by_status.values()),
           "status": {s: by_status.get(s, 0) for s in ("kept", "duplicate", "rejected")},
           "reasons": dict(sorted(reasons.items()))}
    write_json(join(out, STATS_JSON), doc)
    return doc


def embedding_record(named_emb) -> dict:
    n, emb = named_emb
    return {"key": n.key, "embedding": np.frombuffer(emb, np.float32).tolist(), "width": n.width, "height": n.height}
