"""pipeline/read.py on Beam's FnApiRunner: tars (with a damaged one), image folders with captions and
Parquet with image bytes; every input is one RawItem, keys are unique and safe, repeats are numbered."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from flowcurate.models.tiny.procedural import jpeg_bytes, random_image
from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.read import ReadRaw, input_patterns, read_tar


def run(specs, **kw):
    """Run ReadRaw on the FnApiRunner; the items come back through a pickle file."""
    out = Path(tempfile.mkdtemp()) / "items.pkl"
    with TestPipeline(runner="FnApiRunner") as p:
        (p | ReadRaw([str(s) for s in specs], **kw) | beam.combiners.ToList()
         | beam.Map(lambda xs, path=str(out): Path(path).write_bytes(pickle.dumps(list(xs)))))
    return pickle.loads(out.read_bytes())


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    truth = write_sample_data(root, n=96, seed=1)
    return root, truth


def test_sample_shards_are_read_completely(sample):
    root, truth = sample
    items = run([root / "raw" / "*.tar"])
    keys = [it.key for it in items]
    assert len(keys) == len(set(keys)) == truth["n"]
    by_key = {it.key: it for it in items}
    missing = [k for k, b in truth["broken"].items() if b["reason"] == "missing_image"]
    assert missing and all(by_key[k].reason == "missing_image" and by_key[k].image is None for k in missing)
    ok = [it for it in items if it.reason is None]
    assert all(it.image is not None for it in ok) and all("#" in it.source for it in ok)  # b"": empty_file later
    assert sum(it.caption is not None for it in ok) > 0.9 * len(ok)


def test_damaged_tar_repeats_folder_and_parquet(tmp_path, write_tar):
    jpg = jpeg_bytes(random_image(__import__("numpy").random.default_rng(0), 48)[0])
    write_tar(tmp_path / "a.tar", [("../../etc/passwd.jpg", jpg), ("0001.jpg", jpg), ("0001.txt", b"a cat"),
                              ("0002.jpg", jpg)])
    whole = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:3000])  # inside the second member's data
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "0001.jpg").write_bytes(jpg)  # key sub/0001: no clash
    (tmp_path / "imgs" / "0002.jpg").write_bytes(jpg)  # key 0002: repeats a.tar's
    (tmp_path / "imgs" / "0002.txt").write_text("a dog\n")
    pq.write_table(pa.table({"key": ["p1", "0001"], "image": [jpg, b""], "caption": ["x", "y"]}),
                   tmp_path / "t.parquet")
    items = run([tmp_path / "a.tar", tmp_path / "cut.tar", tmp_path / "imgs", tmp_path / "t.parquet"])
    by_key = {it.key: it for it in items}
    assert len(by_key) == len(items)
    assert by_key["etc/passwd"].reason is None  # sanitised, never a path
    assert by_key["cut#truncated"].reason == "unreadable_archive_tail"
    assert by_key["sub/0001"].source.endswith("imgs/sub/0001.jpg")
    # 0001 in a.tar and in the Parquet (and in cut.tar when it lies before the damage): numbered
    repeats = sorted(k for k in by_key if k.startswith("0001"))
    in_cut = sum(it.key == "0001" for it in read_tar(str(tmp_path / "cut.tar")))
    assert repeats[:2] == ["0001", "0001~2"] and len(repeats) == 2 + in_cut
    assert by_key["0001"].reason is None and by_key["0001"].caption == "a cat"
    assert {by_key[k].reason for k in repeats[1:]} == {"duplicate_key"}
    two = sorted(k for k in by_key if k.startswith("0002"))
    assert two == ["0002", "0002~2"]
    assert by_key["p1"].reason is None and by_key["p1"].caption == "x"
    # rerun in another order: the same keys with the same sources
    again = {it.key: it.source for it in run([tmp_path / "t.parquet", tmp_path / "imgs", tmp_path / "cut.tar",
                                              tmp_path / "a.tar"])}
    assert again == {k: it.source for k, it in by_key.items()}


def test_input_patterns(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.tar").write_bytes(b"")
    assert input_patterns(str(tmp_path / "d")) == (f"{tmp_path}/d/**", f"{tmp_path}/d")
    assert input_patterns(str(tmp_path / "d" / "x.tar")) == (str(tmp_path / "d" / "x.tar"), str(tmp_path / "d"))
    assert input_patterns(f"{tmp_path}/d/*.tar") == (f"{tmp_path}/d/*.tar", f"{tmp_path}/d")


def test_read_tar_streams_without_seeking(tmp_path, write_tar):
    jpg = b"\xff\xd8" + b"x" * 100
    write_tar(tmp_path / "s.tar", [("k1.jpg", jpg), ("k1.json", json.dumps({}).encode()), ("k2.txt", b"no image")])
    got = list(read_tar(str(tmp_path / "s.tar")))
    assert [(g.key, g.reason) for g in got] == [("k1", None), ("k2", "missing_image")]
