"""pipeline/neardup.py on the FnApiRunner: near-duplicate decisions equal `flowcurate dedup`'s core
(`flowcurate.dedup.core.find_duplicates`) on the same descriptors, clustered and exact, and bad descriptors are
rejected rows."""

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
from flowcurate.models.tiny.planted import generate
from flowcurate.pipeline.neardup import Embedded, NearDupDedup
from flowcurate.pipeline.stages import Accepted


def _data(n=400, d=32, seed=0):
    """`flowcurate.models.tiny.planted` rows (clustered: topics for k-means to find), a seventh of them
    near-copies at cosines 0.5-1, with unique keys and image sizes."""
    x = np.empty((n, d), np.float32)
    generate(x, "clustered", seed, fraction=1 / 7, bins=((0.5, 1.0),))
    rng = np.random.default_rng([seed, 7])
    keys = [f"k{rng.integers(1e9):09d}{i}" for i in range(n)]
    w = rng.integers(32, 96, n)
    h = rng.integers(32, 96, n)
    return x, keys, w, h


def _items(x, keys, w, h):
    tiny = np.zeros((1, 1, 3), np.uint8)
    return [Embedded(Accepted(k, f"src/{k}", None, tiny, int(a), int(b), (0, 0, int(a), int(b)), (1, 1), "h"), v)
            for k, v, a, b in zip(keys, x, w, h)]


def _run(items, cfg: DedupConfig):
    out = Path(tempfile.mkdtemp())
    with TestPipeline(runner="FnApiRunner") as p:
        r = p | beam.Create(items, reshuffle=False) | NearDupDedup(cfg)
        for name in ("kept", "duplicates", "rejected"):
            (r[name] | f"{name}L" >> beam.combiners.ToList()
             | f"{name}W" >> beam.Map(lambda xs, f=str(out / name): Path(f).write_bytes(pickle.dumps(xs))))
    return {n: pickle.loads((out / n).read_bytes()) for n in ("kept", "duplicates", "rejected")}


@pytest.mark.parametrize("clusters,exact", [("4", False), ("auto", False), ("1", True)])
def test_decisions_equal_the_dedup_core(clusters, exact):
    x, keys, w, h = _data()
    items = _items(x, keys, w, h)
    items = items[::-1]  # arrival order must not matter
    cfg = DedupConfig(threshold=0.6, clusters=clusters, assign=3, assign_margin=0.1, kmeans_sample=120, exact=exact)
    got = _run(items, cfg)
    ref = find_duplicates(x, keys, cfg, pixels=(w * h).astype(np.float64))
    names = ref.status_names()
    want_dup = {ref.keys[i]: (ref.keys[ref.duplicate_of[i]], report_similarity(ref.similarity[i]))
                for i in range(len(keys)) if names[i] == "duplicate"}
    got_dup = {r["key"]: (r["duplicate_of"], r["similarity"]) for r in got["duplicates"]}
    assert want_dup and got_dup == want_dup
    assert {e.item.key for e, _ in got["kept"]} == {k for k, s in zip(ref.keys, names) if s == "kept"}
    clusters_got = {e.item.key: c for e, c in got["kept"]}
    assert all(clusters_got[k] == ref.cluster[i] for i, k in enumerate(ref.keys) if k in clusters_got)
    assert not got["rejected"] and set(STATUS) >= set(names)


def test_bad_descriptors_become_rejected_rows():
    x, keys, w, h = _data(n=30)
    x[3] = 0
    x[7, 0] = np.nan
    got = _run(_items(x, keys, w, h), DedupConfig(threshold=0.6))
    assert {r["key"]: r["reason"] for r in got["rejected"]} == {keys[3]: "bad_embedding", keys[7]: "bad_embedding"}
    assert len(got["kept"]) + len(got["duplicates"]) + len(got["rejected"]) == 30
