"""dedup's device-resident path (torch; on the CPU here, on CUDA where there is one): the same pairs,
cosines, assignments and decisions as the numpy path, whatever the tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowcurate.dedup.device as device  # noqa: E402
from flowcurate.dedup import kmeans  # noqa: E402
from flowcurate.dedup.assign import assign_clusters  # noqa: E402
from flowcurate.dedup.core import find_duplicates  # noqa: E402
from flowcurate.dedup.engine import Engine  # noqa: E402
from flowcurate.dedup.numerics import unit_rows  # noqa: E402
from flowcurate.dedup.search import find_pairs, find_pairs_in_groups  # noqa: E402
from flowcurate.formats.config import DedupConfig  # noqa: E402
from flowcurate.models.tiny.planted import generate  # noqa: E402

T = 0.5


def cfg(threshold=T, **fields) -> DedupConfig:
    return DedupConfig(threshold=threshold, **fields)


def data(n=700, d=48, seed=0):
    """`flowcurate.models.tiny.planted` rows (isotropic), half of them near-copies at every cosine from
    0.3 to 1 (many near the threshold), exact copies, a scattered scale; float32."""
    x = np.empty((n, d), np.float32)
    generate(x, "isotropic", seed, fraction=0.5, bins=((0.3, 1.0),))
    x = x.astype(np.float64)
    x[-5:] = x[-6]
    rng = np.random.default_rng([seed, 7])
    x *= rng.uniform(0.01, 100, size=(n, 1))
    return x.astype(np.float32), [f"k{v:05d}" for v in rng.permutation(n)]


def resident(precision, device="cpu"):
    return Engine("torch", device, precision, resident=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_resident_search_equals_numpy_for_any_tiling(precision, monkeypatch):
    x, _ = data()
    rows = np.arange(len(x))
    groups = [rows, rows[::3], rows[100:110], rows[5:6], rows[::-7]]  # overlapping; one descending
    ref_pairs, ref_cos, ref_stats = find_pairs_in_groups(x, groups, T)
    assert len(ref_pairs) > 300
    for tile, block_rows in ((1 << 28, 2048), (4000, 64), (500, 37)):
        monkeypatch.setattr(device, "DEVICE_TILE", tile)
        pairs, cos, stats = find_pairs_in_groups(
            x, groups, T, engine=resident(precision), block_rows=block_rows
        )
        assert np.array_equal(pairs, ref_pairs) and np.array_equal(cos, ref_cos)
        assert stats["device"]["resident"] and stats["candidates"] >= len(pairs)
        assert stats["tasks"] == sum(-(-len(g) // block_rows) for g in groups if len(g) >= 2)


def test_device_assignment_equals_numpy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((900, 24)).astype(np.float32)
    c = unit_rows(rng.standard_normal((60, 24)))
    c[7] = c[3]  # tied centroids: the lower id wins
    c[11] = c[3]
    x[:20] = c[3] + 1e-3 * rng.standard_normal((20, 24))  # rows at the tie
    for assign, margin in ((1, None), (3, None), (8, 0.1), (8, 0.02)):
        ref = assign_clusters(x, c, assign, assign_margin=margin)
        got = assign_clusters(x, c, assign, assign_margin=margin, engine=resident("fp16"), block_rows=128)
        assert np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1], equal_nan=True)
    assert np.all(ref[0][:20, 0] == 3)


def test_find_duplicates_resident_equals_numpy_on_a_float16_memmap(tmp_path):
    x, keys = data(n=900, seed=2)
    x16 = (x / np.abs(x).max(axis=1, keepdims=True)).astype(np.float16)
    x16[3] = 0  # a rejected row
    mm = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float16, shape=x16.shape)
    mm[:] = x16
    mm.flush()
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    kw = dict(clusters="12", assign=4, kmeans_sample=500)
    for exact in (False, True):
        ref = find_duplicates(mm, keys, cfg(exact=exact, **kw))
        got = find_duplicates(mm, keys, cfg(exact=exact, block_rows=100, **kw), engine=resident("fp16"))
        assert got.stats["engine"] == "Engine('torch', 'cpu', 'fp16')"
        for f in ("assignment", "pairs", "pair_cos", "status", "duplicate_of", "cluster"):
            assert np.array_equal(getattr(ref, f), getattr(got, f)), f
        assert np.array_equal(ref.similarity, got.similarity, equal_nan=True)
        assert ref.counts()["rejected"] == 1 and ref.counts()["duplicate"] > 100


def test_floor_in_and_on_device():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for v in (0.4949999, 0.5 - 5e-3, -0.3, 0.0):
            c = device.floor_in(v, dtype)
            assert c <= v and float(torch.tensor(c, dtype=dtype)) == c
            if c != 0:  # the next value up (one step on the bits toward +inf) is above v
                t = torch.tensor([c], dtype=dtype)
                bits = t.view(torch.int16 if t.element_size() == 2 else torch.int32)
                bits += 1 if c > 0 else -1
                assert float(t) > v
    assert not Engine().on_device
    with pytest.raises(ValueError):  # a torch engine on the CPU is only the resident path
        Engine("torch", "cpu", "fp32")
    assert (
        Engine("torch", "cuda", "fp16").on_device
        and not Engine("torch", "cuda", "fp16", resident=False).on_device
    )
    assert resident("fp32").on_device


# ----------------------------------------------------------------------------- torch k-means


def blobs(n=4000, d=32, centres=40, seed=4):
    rng = np.random.default_rng(seed)
    c = unit_rows(rng.standard_normal((centres, d)))
    x = c[rng.integers(0, centres, n)] + 0.25 * rng.standard_normal((n, d)) / np.sqrt(d)
    return unit_rows(x), [f"b{i:05d}" for i in rng.permutation(n)]


def objective(u, c):
    return float((u @ c.T).max(axis=1).mean())


def test_torch_kmeans_is_deterministic_order_free_and_as_good_as_faiss():
    u, keys = blobs()
    ours = kmeans.train_centroids(u, keys, 40, seed=1, device="cpu")
    again = kmeans.train_centroids(u, keys, 40, seed=1, device="cpu")
    perm = np.random.default_rng(9).permutation(len(u))
    shuffled = kmeans.train_centroids(u[perm], [keys[i] for i in perm], 40, seed=1, device="cpu")
    assert np.array_equal(ours, again) and np.array_equal(ours, shuffled)
    assert ours.shape == (40, 32) and np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    faiss_c = kmeans.train_centroids(u, keys, 40, seed=1)
    # Lloyd from a random start finds the blobs as well as FAISS does (mean cosine to the nearest centroid)
    assert objective(u, ours) >= objective(u, faiss_c) - 0.01
    assert objective(u, ours) > 0.9
    assert not np.array_equal(ours, kmeans.train_centroids(u, keys, 40, seed=2, device="cpu"))


def test_torch_kmeans_refills_empty_clusters():
    rng = np.random.default_rng(0)
    base = unit_rows(rng.standard_normal((3, 16)))
    u = np.concatenate([np.repeat(base, 30, axis=0), unit_rows(rng.standard_normal((4, 16)))]).astype(np.float32)
    c = kmeans.torch_kmeans(u, 10, iters=5, device="cpu")
    assert c.shape == (10, 16) and np.isfinite(c).all()
    # the three repeated points and the four loners each end up with a centroid on them
    assert np.allclose((u @ c.T).max(axis=1), 1, atol=1e-5)


def test_find_pairs_kmeans_choice():
    x, keys = data(n=900, seed=5)
    exact_pairs, exact_cos, _, _ = find_pairs(x, keys, cfg(exact=True))
    exact = {tuple(p): c for p, c in zip(exact_pairs.tolist(), exact_cos.tolist())}
    for method, label in (("auto", "faiss"), ("faiss", "faiss"), ("torch", "torch:cpu")):
        pairs, cos, assignment, stats = find_pairs(x, keys, cfg(clusters="10", assign=3, kmeans=method))
        assert stats["kmeans"] == label
        assert all(exact[tuple(p)] == c for p, c in zip(pairs.tolist(), cos.tolist()))
        assert len(pairs) > 0.5 * len(exact_pairs)
    with pytest.raises(ValueError, match="kmeans"):
        find_pairs(x, keys, cfg(clusters="10", kmeans="sklearn"))
    # the resident CPU engine keeps FAISS under "auto"; only a GPU switches it (and the exact range)
    stats = find_pairs(x, keys, cfg(clusters="10"), engine=resident("fp32"))[3]
    assert stats["kmeans"] == "faiss"
    assert kmeans.auto_clusters(100_000) > 1 and kmeans.auto_clusters(100_000, device=True) == 1
    assert kmeans.auto_clusters(4_000_001, device=True) == round(4 * np.sqrt(4_000_001))
