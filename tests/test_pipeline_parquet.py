"""Parquet inputs as the two common tools write them, through the pipeline's own read and validate path
and end to end: img2dataset's Parquet output (a binary `jpg` column, `caption`, `url`, failed downloads
as rows with a null image) and Hugging Face datasets' Parquet (an `image` struct {bytes, path}, `text`,
no key). Every row is one input with a reason when it is not an image; `url` reaches the kept rows and
the sample json; reading streams by record batches of bounded size; the output's index.json opens with
webdataset's `wids`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowcurate.formats.images import ImageRejected
from flowcurate.models.tiny.procedural import jpeg_bytes, random_scene, render
from flowcurate.pipeline.read import (
    ParquetColumns,
    iter_parquet_batches,
    parquet_columns,
    read_items,
    read_parquet,
    read_tar,
)
from flowcurate.pipeline.validate import validate

NOT_AN_IMAGE = b"<html>404 not found</html>" * 8
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _jpeg(seed: int, w: int = 96, h: int = 72) -> bytes:
    return jpeg_bytes(render(random_scene(np.random.default_rng(5000 + seed)), w, h).convert("RGB"))


def write_img2dataset_parquet(path: Path) -> dict:
    """img2dataset's `--output_format parquet` layout: key, jpg, caption, url, status, sizes; a failed
    download is a row with a null jpg. -> truth: key -> expected reason (None: a valid image)."""
    rows = [{"key": f"{i:09d}", "jpg": _jpeg(i), "caption": f"scene {i}", "url": f"https://img.example/{i}.jpg",
             "status": "success", "error_message": None, "width": 96, "height": 72} for i in range(4)]
    rows.append({"key": "000000004", "jpg": None, "caption": "gone", "url": "https://img.example/4.jpg",
                 "status": "failed_to_download", "error_message": "HTTP Error 404", "width": None, "height": None})
    rows.append({"key": "000000005", "jpg": NOT_AN_IMAGE, "caption": "html", "url": "https://img.example/5.jpg",
                 "status": "success", "error_message": None, "width": None, "height": None})
    schema = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("url", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return {"reasons": {r["key"]: None for r in rows[:4]} | {"000000004": "missing_image", "000000005": "undecodable"},
            "urls": {r["key"]: r["url"] for r in rows}, "captions": {r["key"]: r["caption"] for r in rows}}


def write_hf_parquet(path: Path) -> dict:
    """Hugging Face datasets' layout: `image` a struct {bytes, path} (the Image feature), `text`, no key
    column (keys become `{file name}_{row:09d}`). A null struct, a struct holding only a path, and
    non-image bytes are the bad rows."""
    images = [{"bytes": _jpeg(10 + i), "path": f"img_{i}.jpg"} for i in range(3)]
    images += [None, {"bytes": None, "path": "/elsewhere/img_4.jpg"}, {"bytes": NOT_AN_IMAGE, "path": "img_5.jpg"}]
    texts = [f"hf scene {i}" for i in range(6)]
    pq.write_table(pa.table({"image": pa.array(images, HF_IMAGE), "text": texts}), path)
    stem = path.name.replace(".", "_")
    return {"reasons": {f"{stem}_{i:09d}": r for i, r in
                        enumerate([None, None, None, "missing_image", "missing_image", "undecodable"])},
            "captions": {f"{stem}_{i:09d}": t for i, t in enumerate(texts)}}


def _read_and_validate(path: Path) -> dict[str, tuple]:
    """What pass 1 does with one file before the models: read_items, then validate what has bytes.
    -> key -> (reason or None, caption, url)."""
    out = {}
    for raw in read_items(str(path), str(path.parent)):
        reason = raw.reason
        if reason is None:
            try:
                validate(raw.image, resolution=64, min_size=32)
            except ImageRejected as e:
                reason = e.reason
        out[raw.key] = (reason, raw.caption, raw.url)
    return out


# ---------------------------------------------------------------------------------------- layouts

def test_columns_are_found_for_both_layouts_and_metadata_tables_are_not_inputs():
    i2d = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("url", pa.string())])
    assert parquet_columns(i2d) == ParquetColumns("jpg", "bytes", "key", "caption", "url")
    hf = pa.schema([("image", HF_IMAGE), ("text", pa.string())])
    assert parquet_columns(hf) == ParquetColumns("image", "struct", None, "text", None)
    # a struct image under a name of its own, found by its {bytes} field; a prompt column
    other = pa.schema([("picture", HF_IMAGE), ("prompt", pa.large_string())])
    assert parquet_columns(other) == ParquetColumns("picture", "struct", None, "prompt", None)
    # img2dataset's per-shard metadata table beside its tars has no image bytes: not an input
    meta = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string())])
    assert parquet_columns(meta) is None
    # a column the user names wins; a named column that is not image bytes means no image column
    two = pa.schema([("jpg", pa.binary()), ("png", pa.binary()), ("alt", pa.string()), ("text", pa.string())])
    assert parquet_columns(two, image_column="png", caption_column="alt")[:4] == ("png", "bytes", None, "alt")
    assert parquet_columns(two, image_column="alt") is None


def test_img2dataset_parquet_every_row_with_reason_and_url(tmp_path):
    truth = write_img2dataset_parquet(tmp_path / "00000.parquet")
    got = _read_and_validate(tmp_path / "00000.parquet")
    assert {k: r for k, (r, _, _) in got.items()} == truth["reasons"]
    assert {k: u for k, (_, _, u) in got.items()} == truth["urls"]  # the failed download's url too
    assert {k: c for k, (_, c, _) in got.items()} == truth["captions"]


def test_hf_parquet_struct_images_are_bytes_not_dicts(tmp_path):
    """The struct column used to reach validation as a dict (TypeError on every row)."""
    truth = write_hf_parquet(tmp_path / "train-00000-of-00001.parquet")
    raws = list(read_items(str(tmp_path / "train-00000-of-00001.parquet"), str(tmp_path)))
    assert all(r.image is None or isinstance(r.image, bytes) for r in raws)
    got = _read_and_validate(tmp_path / "train-00000-of-00001.parquet")
    assert {k: r for k, (r, _, _) in got.items()} == truth["reasons"]
    assert {k: c for k, (_, c, _) in got.items()} == truth["captions"]
    assert all(u is None for _, _, u in got.values())
    assert [r.source.rsplit("#", 1)[1] for r in raws] == [str(i) for i in range(6)]


def test_tar_json_member_gives_the_url(tmp_path, write_tar):
    jpg = _jpeg(1)
    write_tar(tmp_path / "s.tar", [
        ("a.jpg", jpg), ("a.json", json.dumps({"url": "https://img.example/a.jpg", "key": "a"}).encode()),
        ("b.jpg", jpg), ("b.json", b"{not json"),
        ("c.txt", b"no image"), ("c.json", json.dumps({"url": "https://img.example/c.jpg"}).encode()),
        ("d.jpg", jpg), ("d.json", json.dumps({"url": 7}).encode())])
    got = {r.key: (r.reason, r.url) for r in read_tar(str(tmp_path / "s.tar"))}
    assert got == {"a": (None, "https://img.example/a.jpg"), "b": (None, None),
                   "c": ("missing_image", "https://img.example/c.jpg"), "d": (None, None)}


# ------------------------------------------------------------------------------------- streaming

def test_many_row_groups_are_read_in_bounded_batches(tmp_path):
    """Batches follow a byte budget, not the row groups: 300 rows in 30 row groups, ~20 kB per row,
    a 50 kB budget -> 2 rows per batch, in file order."""
    rng = np.random.default_rng(0)
    rows = [{"key": f"r{i:03d}", "jpg": rng.bytes(20_000), "caption": f"c{i}"} for i in range(300)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10, compression="none")
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_row_groups == 30
    batches = list(iter_parquet_batches(pf, parquet_columns(pf.schema_arrow), batch_bytes=50_000))
    assert len(batches) == 150 and {b.num_rows for b in batches} == {2}
    assert [k for b in batches for k in b.column("key").to_pylist()] == [r["key"] for r in rows]
    got = list(read_parquet(str(path), batch_bytes=50_000))
    assert [g.key for g in got] == [r["key"] for r in rows] and got[123].image == rows[123]["jpg"]


# run in a fresh process: its peak resident memory while reading one file, beyond what it held before
# (Linux: the peak, VmHWM, is reset through /proc/self/clear_refs after the imports)
_PEAK = """
import json, sys
import pyarrow.parquet as pq
from flowcurate.pipeline.read import read_parquet

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS")
if sys.argv[2] == "whole":
    n = pq.read_table(sys.argv[1]).num_rows
else:
    n = sum(len(r.image) > 0 for r in read_parquet(sys.argv[1], batch_bytes=int(sys.argv[2])))
print(json.dumps({"rows": n, "grew": status("VmHWM") - before}))
"""


def _peak(path: Path, how: str) -> dict:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK, str(path), how], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _one_row_group(path: Path, n: int, size: int = 250_000) -> int:
    """n random (incompressible) values of `size` bytes in ONE row group of 1 MB pages, as a writer
    with small write batches makes them; -> the file's size."""
    rng = np.random.default_rng(n)
    table = pa.table({"key": [f"k{i}" for i in range(n)], "jpg": [rng.bytes(size) for _ in range(n)]})
    pq.write_table(table, path, row_group_size=n, compression="none", use_dictionary=False,
                   data_page_size=1 << 20, write_batch_size=4)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return path.stat().st_size


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux /proc")
def test_reading_memory_is_bounded_by_a_batch_not_the_row_group(tmp_path):
    """Streaming a 30 MB and a 120 MB single-row-group file with a 2 MB batch budget: the reader's peak
    memory does not grow with the row group (it did when a row group was read at once), while the
    same measure sees a whole-file read hold all of it."""
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    small_bytes, large_bytes = _one_row_group(small, 120), _one_row_group(large, 480)
    s, big = _peak(small, "2000000"), _peak(large, "2000000")
    assert (s["rows"], big["rows"]) == (120, 480)
    assert big["grew"] - s["grew"] < (large_bytes - small_bytes) / 4, (s, big)
    whole = _peak(large, "whole")
    assert whole["grew"] > large_bytes, whole  # the measure does see a whole row group


# ------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    from flowcurate.pipeline.run import run

    root = tmp_path_factory.mktemp("parquet_run")
    (root / "raw").mkdir()
    i2d = write_img2dataset_parquet(root / "raw" / "00000.parquet")
    hf = write_hf_parquet(root / "raw" / "train-00000-of-00001.parquet")
    stats = run(["--input", str(root / "raw"), "--output", str(root / "out"), "--config", "tiny",
                 "--val_fraction", "0"], log=lambda *a, **k: None)
    return root, i2d, hf, stats


def test_both_layouts_end_to_end_every_row_accounted_for(curated):
    from tests.pipeline_inputs import read_manifest

    root, i2d, hf, stats = curated
    rows = read_manifest(root / "out")
    expected = {**i2d["reasons"], **hf["reasons"]}
    assert set(rows) == set(expected) and stats["inputs"] == len(expected) == 12
    for key, reason in expected.items():
        want = ("kept", None) if reason is None else ("rejected", reason)
        assert (rows[key]["status"], rows[key]["reason"]) == want, (key, rows[key])
    assert rows["000000002"]["source"].endswith("00000.parquet#2")
    # the url rides with the kept rows (the manifest and the sample json), as the original caption does
    for key in (k for k, r in i2d["reasons"].items() if r is None):
        assert rows[key]["url"] == i2d["urls"][key] and rows[key]["caption_original"] == i2d["captions"][key]
    assert all(rows[k]["url"] is None for k in hf["reasons"])
    docs = {}
    for tar in (root / "out" / "shards").glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    doc = json.loads(tf.extractfile(m).read())
                    docs[doc["key"]] = doc
    assert {k: d.get("url") for k, d in docs.items()} == {k: rows[k]["url"] for k in rows if rows[k]["status"] == "kept"}


def test_index_json_opens_with_wids(curated, tmp_path):
    wids = pytest.importorskip("wids")
    from flowcurate.formats.shards import read_index

    root, *_ = curated
    index = read_index(root / "out" / "shards")  # what the trainer reads is still there
    assert index["wids_version"] == 1
    assert index["shardlist"] == [{"url": s["name"], "nsamples": s["samples"]} for s in index["shards"]
                                  if s["split"] == "train"]
    ds = wids.ShardListDataset(str(root / "out" / "shards" / "index.json"), cache_dir=str(tmp_path / "cache"),
                               transformations=[lambda s: s])
    assert len(ds) == sum(s["nsamples"] for s in index["shardlist"]) == 7
    keys = set()
    for i in range(len(ds)):
        sample = ds[i]
        doc = json.load(io.BytesIO(sample[".json"].getvalue()))
        assert doc["key"] == sample["__key__"] and ".latent_mean.npy" in sample
        keys.add(doc["key"])
    assert len(keys) == 7
