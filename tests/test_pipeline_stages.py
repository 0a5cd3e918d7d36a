"""pipeline/stages.py on the FnApiRunner: validation rows and exact-duplicate removal over the sample
data, with every input accounted for exactly once."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.read import ReadRaw
from flowcurate.pipeline.stages import Accepted, ExactDedup, Validate, failed_rows, manifest_row


def _dump(pcoll, label, path):
    return (pcoll | f"{label}List" >> beam.combiners.ToList()
            | f"{label}Write" >> beam.Map(lambda xs, p=str(path): Path(p).write_bytes(pickle.dumps(list(xs)))))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    truth = write_sample_data(root, n=96, seed=2)
    out = Path(tempfile.mkdtemp())
    with TestPipeline(runner="FnApiRunner") as p:
        raw = p | ReadRaw([str(root / "raw" / "*.tar")])
        v = raw | beam.ParDo(Validate(64, 32, 3.0, 89_478_485)).with_outputs(Validate.REJECTED, main="ok")
        d = v.ok | ExactDedup()
        _dump(v[Validate.REJECTED], "rej", out / "rejected.pkl")
        _dump(d.kept, "kept", out / "kept.pkl")
        _dump(d[ExactDedup.DUPLICATES], "dup", out / "dup.pkl")
    load = lambda name: pickle.loads((out / f"{name}.pkl").read_bytes())  # noqa: E731
    return truth, load("rejected"), load("kept"), load("dup")


def test_every_input_is_accounted_for_once(run):
    truth, rejected, kept, dups = run
    keys = [r["key"] for r in rejected] + [a.key for a in kept] + [r["key"] for r in dups]
    assert len(keys) == len(set(keys)) == truth["n"]


def test_rejections_match_the_planted_broken_samples(run):
    truth, rejected, _, _ = run
    got = {r["key"]: r["reason"] for r in rejected}
    assert got == {k: b["reason"] for k, b in truth["broken"].items()}


def test_exact_copies_are_removed_with_similarity_one(run):
    truth, _, kept, dups = run
    kept_keys = {a.key for a in kept}
    exact = {k: g["original"] for g in truth["duplicate_groups"] for k, kind in g["copies"].items() if kind == "exact"}
    by_key = {r["key"]: r for r in dups}
    assert exact
    for copy, original in exact.items():
        pair = {copy, original}
        removed = pair & set(by_key)
        assert len(removed) == 1 and (pair - removed) <= kept_keys
        r = by_key[removed.pop()]
        assert r["similarity"] == 1.0 and r["duplicate_of"] in pair and r["status"] == "duplicate"
    assert all(a.image.shape == (64, 64, 3) for a in kept)


def test_manifest_row_rejects_unknown_fields():
    assert manifest_row("k", "s", "kept")["notes"] == []
    with pytest.raises(ValueError, match="unknown"):
        manifest_row("k", "s", "kept", colour="red")


def test_failed_rows_name_every_item_of_a_dead_batch_whatever_its_stage():
    import numpy as np

    from flowcurate.pipeline.chunks import Chunk
    from flowcurate.pipeline.encode import Captioned, Kept

    def acc(i):
        return Accepted(f"k{i}", f"s{i}", None, np.zeros((2, 2, 3), np.uint8), 10 + i, 20 + i, (0, 0, 2, 2),
                        (2, 2), "h")

    a = [acc(i) for i in range(5)]
    sscd = [Chunk("g", 0, a[:2]), Chunk("g", 1, a[2:3])]  # a batch of chunks of Accepted
    caption = [(Chunk("g", 2, [Kept(a[3], 0, "train-000000.tar")]), "payload")]  # keyed: (chunk, payload)
    encode = Chunk("g", 3, [Captioned(Kept(a[4], 1, "train-000000.tar"), "o", "s", ())])  # one element
    rows = [r for batch in (sscd, caption, encode) for r in failed_rows("encode")((batch, RuntimeError("x")))]
    assert [(r["key"], r["source"], r["status"], r["reason"]) for r in rows] == [
        (f"k{i}", f"s{i}", "rejected", "failed:encode") for i in range(5)]
    assert all(r["width"] is None for r in rows)
    sized = list(failed_rows("filter:aesthetic", sizes=True)((sscd, RuntimeError("x"))))
    assert [(r["reason"], r["width"], r["height"]) for r in sized] == [
        ("failed:filter:aesthetic", 10 + i, 20 + i) for i in range(3)]
