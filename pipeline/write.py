"""Writing OUT through Beam's FileSystems (local paths, gs://, s3://, ...), each file under a temporary
name and renamed, so a reader never sees half a file:

    OUT/conditioning.json + .npz       the conditioning record, written once per run
    OUT/shards/{train,val}-NNNNNN.tar  curated samples; OUT/shards/index.json
    OUT/manifest/part-*.parquet        one row per input
    OUT/embeddings/part-*.parquet      SSCD descriptors of the inputs near-duplicate search saw
    OUT/stats.json                     counts per status and reason, and what produced them

Shards are contiguous ranges of the kept inputs in (input file, reading order), `shard_size` each.
Pass 2 streams each input file's samples into part tars, one per (shard, file), under
OUT/shards/.parts/; a shard made of one part is renamed into place, otherwise its parts are
concatenated in file order. Reruns give byte-identical shards.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import uuid

from apache_beam.io.filesystems import FileSystems

from flowcurate.formats.shards import SampleWriter

PARTS_DIR = ".parts"


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
    """Samples streamed into OUT/shards/.parts/{shard}/{file_index:09d}.tar (one sample held at a time)."""

    def __init__(self, out: str, shard: str, file_index: int):
        self.shard, self.file_index = shard, file_index
        self.path = join(out, "shards", PARTS_DIR, shard, f"{file_index:09d}.tar")
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
