"""dedup on CUDA (`gpu` marker; skipped without a GPU): the same pairs, cosines, assignments and
decisions as the CPU path, and torch k-means deterministic on the device."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flowcurate.dedup import kmeans  # noqa: E402
from flowcurate.dedup.core import find_duplicates  # noqa: E402
from flowcurate.dedup.engine import make_engine  # noqa: E402
from flowcurate.formats.config import DedupConfig  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

T = 0.5
FIELDS = ("assignment", "pairs", "pair_cos", "status", "duplicate_of")


def cfg(threshold=T, **fields) -> DedupConfig:
    return DedupConfig(threshold=threshold, **fields)


def data(n, d, seed):
    from test_dedup_gpu_batching import data as near_copies  # the CPU tests' data

    return near_copies(n=n, d=d, seed=seed)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_equals_numpy(precision):
    x, keys = data(n=3000, d=64, seed=3)
    kw = dict(clusters="30", assign=8, kmeans_sample=2000, kmeans="faiss")  # the same centroids
    for exact in (False, True):
        ref = find_duplicates(x, keys, cfg(exact=exact, **kw))
        got = find_duplicates(x, keys, cfg(exact=exact, **kw), engine=make_engine("cuda", precision))
        for f in FIELDS:
            assert np.array_equal(getattr(ref, f), getattr(got, f)), f


def test_cuda_torch_kmeans_is_deterministic_and_as_good_as_faiss():
    from test_dedup_gpu_batching import blobs, objective

    u, keys = blobs(n=20000, d=64, centres=100)
    a = kmeans.train_centroids(u, keys, 100, device="cuda")
    b = kmeans.train_centroids(u, keys, 100, device="cuda")
    assert np.array_equal(a, b)
    assert objective(u, a) >= objective(u, kmeans.train_centroids(u, keys, 100)) - 0.01
    x, keys = data(n=3000, d=64, seed=3)
    kw = dict(clusters="30", assign=8, kmeans_sample=2000)
    r1 = find_duplicates(x, keys, cfg(**kw), device="cuda")
    r2 = find_duplicates(x, keys, cfg(**kw), device="cuda")
    assert r1.stats["kmeans"] == "torch:cuda"
    for f in FIELDS:
        assert np.array_equal(getattr(r1, f), getattr(r2, f)), f
