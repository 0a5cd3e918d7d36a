"""Pass 1 and the global decisions on the FnApiRunner over the sample data: every input accounted for
exactly once, rejections match the planted broken samples, exact copies are removed with similarity 1,
and a chunk whose model raises becomes one dead-letter row per item."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline

from flowcurate.formats.config import DedupConfig
from flowcurate.models.sscd import SSCDPreprocess
from flowcurate.models.tiny import ensure_tiny_models
from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.decide import Decide
from flowcurate.pipeline.pass1 import Pass1, Pass1Settings
from flowcurate.pipeline.read import InputFile
from flowcurate.pipeline.records import file_index_of, manifest_row, ordinal_of


def settings(sscd: str, **kw) -> Pass1Settings:
    return Pass1Settings(resolution=64, min_size=32, max_aspect=3.0, max_pixels=89_478_485, buckets=None,
                         sscd_location=sscd, sscd_preprocess=SSCDPreprocess(64), chunk=8, device="cpu", **kw)


def run_pass1(files: list[str], s: Pass1Settings, decide: bool = True) -> dict:
    out = Path(tempfile.mkdtemp())

    def dump(pcoll, name):
        return (pcoll | f"{name}List" >> beam.combiners.ToList()
                | f"{name}Write" >> beam.Map(lambda xs, f=str(out / name): Path(f).write_bytes(pickle.dumps(xs))))

    with TestPipeline(runner="FnApiRunner") as p:
        items = (p | beam.Create([(i, InputFile(f, str(Path(f).parent))) for i, f in enumerate(files)])
                 | beam.ParDo(Pass1(s)))
        dump(items, "items")
        if decide:
            d = items | Decide(DedupConfig(threshold=0.75), 0.1)
            dump(d["rows"], "rows")
            dump(d["kept"], "kept")
    return {f.name: pickle.loads(f.read_bytes()) for f in out.iterdir()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    truth = write_sample_data(root, n=96, seed=2)
    sscd = str(ensure_tiny_models(0) / "sscd.torchscript.pt")
    files = sorted(str(f) for f in (root / "raw").glob("*.tar"))
    return truth, files, run_pass1(files, settings(sscd))


def test_every_input_is_accounted_for_once(sample):
    truth, files, got = sample
    items = got["items"]
    assert len({it.id for it in items}) == len(items) == truth["n"]
    assert {file_index_of(it.id) for it in items} == set(range(len(files)))
    keys = [r["key"] for r in got["rows"]] + [k.key for k in got["kept"]]
    assert len(keys) == len(set(keys)) == truth["n"]


def test_records_hold_no_pixels_and_valid_ones_a_descriptor(sample):
    _, _, got = sample
    for it in got["items"]:
        assert all(not isinstance(v, np.ndarray) for v in it)  # descriptors travel as bytes
        if it.reason is None:
            v = it.vector()
            assert v.shape == (512,) and abs(float(np.linalg.norm(v)) - 1) < 1e-4
            assert it.width and it.height and it.pixel_hash.startswith("sha256:") and len(it.crop) == 4
    ordinals = sorted(ordinal_of(it.id) for it in got["items"] if file_index_of(it.id) == 0)
    assert ordinals == list(range(len(ordinals)))  # reading order, no gaps


def test_rejections_match_the_planted_broken_samples(sample):
    truth, _, got = sample
    rejected = {r["key"]: r["reason"] for r in got["rows"] if r["status"] == "rejected"}
    assert rejected == {k: b["reason"] for k, b in truth["broken"].items()}


def test_exact_copies_are_removed_with_similarity_one(sample):
    truth, _, got = sample
    kept_keys = {k.key for k in got["kept"]}
    exact = {k: g["original"] for g in truth["duplicate_groups"] for k, kind in g["copies"].items() if kind == "exact"}
    by_key = {r["key"]: r for r in got["rows"] if r["status"] == "duplicate"}
    assert exact
    for copy, original in exact.items():
        pair = {copy, original}
        # exactly one of the two is removed for the other: with similarity 1.0 when the survivor is kept;
        # when the survivor is itself a near duplicate of a third image (the near-dup step runs on exact
        # survivors), both name that third image with the survivor's cosine: duplicate_of is always kept
        removed = [k for k in pair & set(by_key)]
        if len(removed) == 1:
            (survivor,) = pair - set(removed)
            r = by_key[removed[0]]
            assert survivor in kept_keys and r["duplicate_of"] == survivor
            assert r["similarity"] == 1.0 and r["status"] == "duplicate"
        else:
            a, b = (by_key[k] for k in sorted(pair))
            assert a["duplicate_of"] == b["duplicate_of"] not in pair
            assert a["similarity"] == b["similarity"] < 1.0
    assert all(r["duplicate_of"] in kept_keys for r in by_key.values())


def test_manifest_row_rejects_unknown_fields():
    assert manifest_row("k", "s", "kept")["notes"] == []
    with pytest.raises(ValueError, match="unknown"):
        manifest_row("k", "s", "kept", colour="red")


class _Broken(torch.nn.Module):
    """A TorchScript model that loads but raises on every batch (its input has the wrong width)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(7, 4)

    def forward(self, x):
        return self.fc(x)


def test_a_failing_sscd_chunk_gives_a_failed_row_per_item(sample, tmp_path):
    _, files, _ = sample
    path = tmp_path / "broken.torchscript.pt"
    torch.jit.script(_Broken()).save(str(path))
    got = run_pass1(files[:1], settings(str(path)), decide=False)
    reasons = {it.reason for it in got["items"]}
    valid_before = [it for it in got["items"] if it.reason == "failed:sscd"]
    assert valid_before and reasons <= {"failed:sscd", "missing_image", "empty_file", "truncated", "undecodable"}
    assert all(it.width and it.embedding is None for it in valid_before)
