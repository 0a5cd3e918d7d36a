"""Writing OUT through Beam's FileSystems (local paths, gs://, s3://, ...), each file under a temporary
name and renamed, so a reader never sees half a file:

    OUT/conditioning.json + .npz      the conditioning record (flowcurate.formats.shards), written once per run
    OUT/shards/{train,val}-NNNNNN.tar  curated samples; OUT/shards/index.json
    OUT/manifest/part-*.parquet       one row per input (MANIFEST_SCHEMA)
    OUT/embeddings/part-*.parquet     SSCD descriptors of every embedded image (dedup's schema)
    OUT/stats.json                    counts per status and reason, and what produced them

Shards are assembled in two steps so no worker holds a whole shard in one element: each chunk of a
shard (key-ordered, `flowcurate.pipeline.chunks`) is written as a part tar under OUT/shards/.parts/, then the
parts are concatenated in chunk order into the shard. The result equals `flowcurate.formats.shards.tar_bytes`
over all of the shard's samples (sorted by key, fixed headers), so reruns give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import uuid

from apache_beam.io.filesystems import FileSystems

from flowcurate.formats.shards import tar_bytes

PARTS_DIR = ".parts"




def join(*parts: str) -> str:
    return FileSystems.join(*parts) if "://" in parts[0] else posixpath.join(*parts)


def write_file(path: str, data: bytes) -> str:
    """Write `data` to `path` under a temporary name, then rename it into place."""
    tmp = join(posixpath.dirname(path) or ".", f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
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


def write_part(out: str, shard: str, index: int, samples: list[dict]) -> str:
    """One chunk's samples as a tar under OUT/shards/.parts/{shard}/ -> its path."""
    return write_file(join(out, "shards", PARTS_DIR, shard, f"{index:06d}.tar"), tar_bytes(samples))


def concat_parts(out: str, shard: str, parts: list[str]) -> str:
    """Concatenate part tars (given in chunk order) into OUT/shards/{shard}; delete the parts."""
    path = join(out, "shards", shard)
    tmp = join(out, "shards", f".{shard}.tmp-{uuid.uuid4().hex}")
    with FileSystems.create(tmp) as fh:
        with tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT) as dst:
            for part in parts:
                with tarfile.open(fileobj=io.BytesIO(read_file(part)), mode="r") as src:
                    for info in src.getmembers():
                        dst.addfile(info, src.extractfile(info))
    FileSystems.rename([tmp], [path])
    FileSystems.delete(parts)
    return path


def write_json(path: str, doc: dict) -> str:
    return write_file(path, (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode())
