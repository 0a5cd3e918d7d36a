"""dedup on CUDA (`gpu` marker; skipped without a GPU): exact mode finds FAISS's pairs, clustered mode
equals the CPU path field by field, and torch k-means is deterministic on the device.

Data: `flowcurate.models.tiny.planted` (clustered, 512-d, 6 % planted copies), float16 as on disk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dedup_gpu_batching import blobs, objective  # noqa: E402  (tests/ is on sys.path under pytest)
from test_dedup_gpu_batching import data as near_copies  # noqa: E402

from flowcurate.dedup import kmeans  # noqa: E402
from flowcurate.dedup.core import find_duplicates  # noqa: E402
from flowcurate.dedup.engine import make_engine  # noqa: E402
from flowcurate.dedup.numerics import pair_cosines, unit_rows  # noqa: E402
from flowcurate.formats.config import DedupConfig  # noqa: E402
from flowcurate.models.tiny.planted import generate  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

T = 0.5
FIELDS = ("assignment", "pairs", "pair_cos", "status", "duplicate_of", "cluster")


def cfg(threshold=T, **fields) -> DedupConfig:
    return DedupConfig(threshold=threshold, **fields)


def planted(n: int, d: int = 512, seed: int = 1):
    x = np.empty((n, d), np.float16)
    generate(x, "clustered", seed, chunk=16384, threads=4)
    return x, [f"{i:09d}" for i in range(n)]


def assert_same(a, b):
    for f in FIELDS:
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert np.array_equal(a.similarity, b.similarity, equal_nan=True)


def test_exact_on_the_device_finds_faiss_range_search_pairs():
    """50k rows, all pairs: ours on the GPU (fp16 candidates, float32 re-check) against FAISS
    IndexFlatIP.range_search of every row on the canonical float32 unit rows."""
    import faiss

    x, keys = planted(50_000)
    res = find_duplicates(x, keys, cfg(exact=True, block_rows=8192), device="cuda")
    u = np.concatenate([unit_rows(x[s : s + 16384]) for s in range(0, len(x), 16384)])
    index = faiss.IndexFlatIP(u.shape[1])
    index.add(u)
    lims, _, ids = index.range_search(u, np.float32(T))
    src = np.repeat(np.arange(len(u)), np.diff(lims).astype(np.int64))
    keep = src < ids
    theirs = set(zip(src[keep].tolist(), ids[keep].astype(np.int64).tolist()))
    ours = set(map(tuple, res.pairs.tolist()))
    assert len(ours) > 1000 and res.stats["device"]["resident"]
    # FAISS scores with its own sgemm (~1e-7 off the canonical cosine): only pairs that close to the
    # threshold may differ, and none did when this was measured
    odd = np.array(sorted(ours ^ theirs), dtype=np.int64).reshape(-1, 2)
    assert np.all(np.abs(pair_cosines(x, odd) - T) < 1e-5), odd[:5]


def test_clustered_on_the_device_equals_the_cpu():
    """100k rows, clustered mode with the same (FAISS) centroids: assignment, pairs, cosines and
    decisions from the GPU path equal the numpy path's."""
    x, keys = planted(100_000)
    # clustered mode (a GPU's "auto" would search 100k exactly) with k = 4 sqrt(N), as on the CPU
    c = cfg(clusters=str(kmeans.auto_clusters(len(x))), kmeans="faiss")
    ref = find_duplicates(x, keys, c)
    got = find_duplicates(x, keys, c, device="cuda")
    assert got.stats["engine"] == "Engine('torch', 'cuda', 'fp16')" and got.stats["n_clusters"] > 1000
    assert_same(ref, got)
    assert ref.counts()["duplicate"] > 5000


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_equals_numpy(precision):
    x, keys = near_copies(n=3000, d=64, seed=3)  # many pairs just around the threshold
    kw = dict(clusters="30", assign=8, kmeans_sample=2000, kmeans="faiss")  # the same centroids
    for exact in (False, True):
        ref = find_duplicates(x, keys, cfg(exact=exact, **kw))
        got = find_duplicates(x, keys, cfg(exact=exact, **kw), engine=make_engine("cuda", precision))
        assert_same(ref, got)


def test_cuda_torch_kmeans_is_deterministic_and_as_good_as_faiss():
    u, keys = blobs(n=20000, d=64, centres=100)
    a = kmeans.train_centroids(u, keys, 100, device="cuda")
    b = kmeans.train_centroids(u, keys, 100, device="cuda")
    assert np.array_equal(a, b)
    assert objective(u, a) >= objective(u, kmeans.train_centroids(u, keys, 100)) - 0.01
    x, keys = near_copies(n=3000, d=64, seed=3)
    kw = dict(clusters="30", assign=8, kmeans_sample=2000)
    r1 = find_duplicates(x, keys, cfg(**kw), device="cuda")
    r2 = find_duplicates(x, keys, cfg(**kw), device="cuda")
    assert r1.stats["kmeans"] == "torch:cuda"
    assert_same(r1, r2)
