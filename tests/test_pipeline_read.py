"""pipeline/read.py: the input list on Beam's FnApiRunner, then each file's items: tars (with a damaged
one), image folders with captions and Parquet with image bytes (row group by row group); every input is
one RawItem, keys are safe, and with `decide.number_repeats` unique."""

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
from flowcurate.pipeline.decide import number_repeats
from flowcurate.pipeline.read import ListInputs, input_patterns, read_items, read_tar


def list_inputs(specs) -> list:
    """Run ListInputs on the FnApiRunner; the list comes back through a pickle file."""
    out = Path(tempfile.mkdtemp()) / "files.pkl"
    with TestPipeline(runner="FnApiRunner") as p:
        (p | ListInputs([str(s) for s in specs])
         | beam.Map(lambda xs, path=str(out): Path(path).write_bytes(pickle.dumps(list(xs)))))
    return pickle.loads(out.read_bytes())


def run(specs, **kw):
    """Every input of every listed file, repeated keys numbered as the pipeline numbers them."""
    by_key: dict[str, list] = {}
    for f in list_inputs(specs):
        for raw in read_items(f.path, f.root, **kw):
            by_key.setdefault(raw.key, []).append(raw)
    return [raw._replace(key=key, reason="duplicate_key" if repeat else raw.reason)
            for key, raws in by_key.items() for raw, key, repeat in number_repeats(key, raws)]


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


def test_parquet_is_read_one_row_group_at_a_time(tmp_path):
    """Row groups stream in order with global row numbers; the file is never read whole."""
    rows = [{"key": f"r{i:03d}", "image": bytes([i % 256]) * 50, "caption": f"c{i}"} for i in range(250)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet", row_group_size=40)
    assert pq.ParquetFile(tmp_path / "g.parquet").num_row_groups == 7
    got = list(read_items(str(tmp_path / "g.parquet"), str(tmp_path)))
    assert [g.key for g in got] == [r["key"] for r in rows]
    assert [g.source.rsplit("#", 1)[1] for g in got] == [str(i) for i in range(250)]
    assert got[123].image == rows[123]["image"] and got[123].caption == "c123"
