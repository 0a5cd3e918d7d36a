"""dedup's device-resident path (torch; on the CPU here, on CUDA where there is one): the same pairs,
cosines, assignments and decisions as the numpy path, whatever the tiling."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dedup.core as core  # noqa: E402
import dedup.search as search  # noqa: E402
from dedup.core import find_duplicates  # noqa: E402
from dedup.search import Engine, assign_clusters, find_pairs_in_groups, unit_rows  # noqa: E402

T = 0.5


def data(n=700, d=48, seed=0):
    """Near-copies at every cosine from 0.3 to 1 (many near the threshold), exact copies, a scattered
    scale; float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    base = rng.integers(0, n // 2, n // 2)
    c = rng.uniform(0.3, 1.0, n // 2)[:, None]
    x[n // 2 :] = c * unit_rows(x[base]) + np.sqrt(1 - c**2) * unit_rows(rng.standard_normal((n // 2, d)))
    x[-5:] = x[-6]
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
        monkeypatch.setattr(search, "DEVICE_TILE", tile)
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


def test_find_duplicates_resident_equals_numpy_on_a_float16_memmap(tmp_path, monkeypatch):
    x, keys = data(n=900, seed=2)
    x16 = (x / np.abs(x).max(axis=1, keepdims=True)).astype(np.float16)
    x16[3] = 0  # a rejected row
    mm = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float16, shape=x16.shape)
    mm[:] = x16
    mm.flush()
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    kw = dict(clusters=12, assign=4, kmeans_sample=500)
    for exact in (False, True):
        ref = find_duplicates(mm, keys, T, exact=exact, **kw)
        monkeypatch.setattr(core, "make_engine", lambda *a, **k: resident("fp16"))
        got = find_duplicates(mm, keys, T, exact=exact, block_rows=100, **kw)
        monkeypatch.undo()
        assert got.stats["engine"] == "Engine('torch', 'cpu', 'fp16')"
        for f in ("assignment", "pairs", "pair_cos", "status", "duplicate_of", "cluster"):
            assert np.array_equal(getattr(ref, f), getattr(got, f)), f
        assert np.array_equal(ref.similarity, got.similarity, equal_nan=True)
        assert ref.counts()["rejected"] == 1 and ref.counts()["duplicate"] > 100


def test_floor_in_and_on_device():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for v in (0.4949999, 0.5 - 5e-3, -0.3, 0.0):
            c = search._floor_in(v, dtype)
            assert c <= v and float(torch.tensor(c, dtype=dtype)) == c
            if c != 0:  # the next value up (one step on the bits toward +inf) is above v
                t = torch.tensor([c], dtype=dtype)
                bits = t.view(torch.int16 if t.element_size() == 2 else torch.int32)
                bits += 1 if c > 0 else -1
                assert float(t) > v
    assert not Engine().on_device and not Engine("torch", "cpu", "fp32").on_device
    assert (
        Engine("torch", "cuda", "fp16").on_device
        and not Engine("torch", "cuda", "fp16", resident=False).on_device
    )
    assert resident("fp32").on_device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_equals_numpy(precision):
    x, keys = data(n=3000, d=64, seed=3)
    kw = dict(clusters=30, assign=8, kmeans_sample=2000)
    for exact in (False, True):
        ref = find_duplicates(x, keys, T, exact=exact, **kw)
        got = find_duplicates(x, keys, T, exact=exact, device="cuda", precision=precision, **kw)
        for f in ("assignment", "pairs", "pair_cos", "status", "duplicate_of"):
            assert np.array_equal(getattr(ref, f), getattr(got, f)), f
