"""pipeline/decide.py on the FnApiRunner: near-duplicate decisions over pass-1 records equal `flowcurate
dedup`'s core (`flowcurate.dedup.core.find_duplicates`) on the same descriptors, clustered and exact, and bad
descriptors are rejected rows."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from flowcurate.dedup.core import STATUS, find_duplicates
from flowcurate.dedup.report import report_similarity
from flowcurate.formats.config import DedupConfig
from flowcurate.pipeline.decide import Decide
from flowcurate.pipeline.records import Item, item_id


def _data(n=400, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d))
    x = centres[rng.integers(0, 6, n)] * 0.8 + rng.standard_normal((n, d))
    m = n // 7
    src, dst = rng.choice(n, m, replace=False), rng.choice(n, m, replace=False)
    x[dst] = x[src] + rng.standard_normal((m, d)) * rng.uniform(0.05, 0.6, (m, 1)) * np.sqrt(d) / 4
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    keys = [f"k{rng.integers(1e9):09d}{i}" for i in range(n)]
    w = rng.integers(32, 96, n)
    h = rng.integers(32, 96, n)
    return x, keys, w, h


def _items(x, keys, w, h):
    return [Item(item_id(i // 50, i % 50), k, f"src/{k}", None, int(a), int(b), (0, 0, int(a), int(b)),
                 f"hash{i}", v.astype(np.float32).tobytes())
            for i, (k, v, a, b) in enumerate(zip(keys, x, w, h))]


def _run(items, threshold=0.5, **kw):
    out = Path(tempfile.mkdtemp())
    with TestPipeline(runner="FnApiRunner") as p:
        r = p | beam.Create(items, reshuffle=False) | Decide(DedupConfig(threshold=threshold, **kw), 0.0)
        for name in ("kept", "rows"):
            (r[name] | f"{name}L" >> beam.combiners.ToList()
             | f"{name}W" >> beam.Map(lambda xs, f=str(out / name): Path(f).write_bytes(pickle.dumps(xs))))
    got = {n: pickle.loads((out / n).read_bytes()) for n in ("kept", "rows")}
    return {"kept": got["kept"], "duplicates": [r for r in got["rows"] if r["status"] == "duplicate"],
            "rejected": [r for r in got["rows"] if r["status"] == "rejected"]}


@pytest.mark.parametrize("clusters,exact", [(4, False), ("auto", False), (1, True)])
def test_decisions_equal_the_dedup_core(clusters, exact):
    x, keys, w, h = _data()
    items = _items(x, keys, w, h)
    items = items[::-1]  # arrival order must not matter
    kw = dict(clusters=str(clusters), assign=3, assign_margin=0.1, kmeans_sample=120, exact=exact)
    got = _run(items, threshold=0.6, **kw)
    ref = find_duplicates(x, keys, DedupConfig(threshold=0.6, **kw), pixels=(w * h).astype(np.float64))
    names = ref.status_names()
    want_dup = {ref.keys[i]: (ref.keys[ref.duplicate_of[i]], report_similarity(ref.similarity[i]))
                for i in range(len(keys)) if names[i] == "duplicate"}
    got_dup = {r["key"]: (r["duplicate_of"], r["similarity"]) for r in got["duplicates"]}
    assert want_dup and got_dup == want_dup
    assert {k.key for k in got["kept"]} == {k for k, s in zip(ref.keys, names) if s == "kept"}
    clusters_got = {k.key: k.cluster for k in got["kept"]}
    assert all(clusters_got[k] == ref.cluster[i] for i, k in enumerate(ref.keys) if k in clusters_got)
    assert not got["rejected"] and set(STATUS) >= set(names)


def test_bad_descriptors_become_rejected_rows():
    x, keys, w, h = _data(n=30)
    x[3] = 0
    x[7, 0] = np.nan
    got = _run(_items(x, keys, w, h), threshold=0.6)
    assert {r["key"]: r["reason"] for r in got["rejected"]} == {keys[3]: "bad_embedding", keys[7]: "bad_embedding"}
    assert len(got["kept"]) + len(got["duplicates"]) + len(got["rejected"]) == 30


def test_near_false_keeps_every_exact_survivor():
    x, keys, w, h = _data(n=60)
    x[5] = x[4]  # a near copy of 4 (identical descriptor, different pixel hash)
    got = _run(_items(x, keys, w, h), threshold=0.6, near=False)
    assert sorted(k.key for k in got["kept"]) == sorted(keys) and not got["duplicates"]
    assert all(k.cluster is None for k in got["kept"])
    near = _run(_items(x, keys, w, h), threshold=0.6)
    assert {keys[4], keys[5]} & {r["key"] for r in near["duplicates"]}


def test_earlier_outputs_items_come_first_and_are_never_removed():
    from flowcurate.pipeline.decide import _resolve

    # earlier items (negative ids) with fewer pixels still win; a pair of two earlier items is ignored
    pairs = [(-5, 7, 0.9), (-6, 8, 0.95), (-5, -6, 0.99), (7, 9, 0.8)]
    nodes = [(-5, "a", 100.0, "/out1"), (7, "b", 200.0, None), (-6, "c", 10.0, "/out2"), (8, "d", 5.0, None),
             (9, "e", 1000.0, None)]
    for priority in ("pixels", "key"):
        got = dict(_resolve(pairs, nodes, priority))
        assert {k: (v[0], v[2]) for k, v in got.items()} == {7: ("a", "/out1"), 8: ("c", "/out2")}
