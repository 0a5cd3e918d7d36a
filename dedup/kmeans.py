"""k-means cells for the search: how many, which items train them (by key hash), and the centroids.

`train_centroids` is spherical k-means on a sample: FAISS on the CPU (deterministic for a seed), or
`torch_kmeans` on a torch device (deterministic for a seed on one device; other centroids than FAISS).
The sample is a pure function of each key (`in_kmeans_sample`), so distributed workers agree on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from flowcurate.dedup.numerics import unit_rows
from flowcurate.formats.hashing import fraction_cut, hasher, stable_hash

EXACT_BELOW = 20_000  # "auto" searches all pairs up to this many items (2e8 pairs: seconds)
# ... and on a GPU up to this many: all pairs at 100 % recall in about a minute there (BENCHMARKS.md)
EXACT_BELOW_DEVICE = 4_000_000


def in_kmeans_sample(key: str, fraction: float) -> bool:
    """Whether `key` belongs to the k-means training sample: a pure function of (key, fraction)."""
    return stable_hash("kmeans_sample", key) < fraction_cut(fraction)


def sample_rows(rows: np.ndarray, keys: Sequence[str], fraction: float) -> np.ndarray:
    """rows: (R,) int64 -> the rows whose key is `in_kmeans_sample` (the same hash and cut, the call
    inlined: it runs over every key)."""
    cut, h = fraction_cut(fraction), hasher("kmeans_sample")
    return np.array([r for r in rows.tolist() if h(keys[r]) < cut], dtype=np.int64)


def kmeans_sample_fraction(n_items: int, n_clusters: int, kmeans_sample: int) -> float:
    """Fraction of items to train on: about `kmeans_sample`, and at least 40 per centroid (FAISS
    warns below 39 per centroid; Clustering.cpp)."""
    if n_items <= 0:
        return 1.0
    return min(1.0, max(kmeans_sample, 40 * n_clusters) / n_items)


def auto_clusters(n_items: int, device: bool = False) -> int:
    """Default k: one cluster (exact search) up to EXACT_BELOW items (EXACT_BELOW_DEVICE when the
    search runs on a GPU, `device`), else about 4 sqrt(N).

    Decision (measured at 1M, BENCHMARKS.md): at equal search work, more and smaller cells with more
    assignments per item recall more; 4 sqrt(N) is where k-means and assignment cost stop paying."""
    return 1 if n_items <= (EXACT_BELOW_DEVICE if device else EXACT_BELOW) else int(round(4 * math.sqrt(n_items)))


def train_centroids(
    vectors: np.ndarray,
    keys: Sequence[str],
    n_clusters: int,
    *,
    iters: int = 10,
    seed: int = 0,
    device: str | None = None,
) -> np.ndarray:
    """Spherical k-means on a sample. vectors: (S, D) raw; keys: (S,) -> (k, D) float32 centroids.

    The sample is sorted by key first, so the result depends on the sample's contents, never on the
    order it arrived in. device None (default): FAISS on the CPU, deterministic for a fixed seed (its
    centroid update loops over points in order per centroid range; 1 and 2 threads agree bit for
    bit). device "cuda" (or any torch device): `torch_kmeans` there. k is capped at the sample size.
    k = 1 skips both: the centroid is the normalised mean.
    """
    order = np.asarray(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
    # normalised in blocks (unit_rows is per row, so bit-identical): a whole-sample float64 copy would
    # make k-means the peak of anonymous memory
    u = np.empty((len(order), vectors.shape[1]), np.float32)
    for s in range(0, len(order), 8192):
        u[s : s + 8192] = unit_rows(np.asarray(vectors[order[s : s + 8192]]))
    k = max(1, min(int(n_clusters), len(u)))
    if k == 1:
        mean = u.astype(np.float64).sum(axis=0) if len(u) else np.ones(vectors.shape[1])
        if not np.any(mean):
            mean = np.ones(vectors.shape[1])
        return unit_rows(mean[None])
    if device is not None:
        return torch_kmeans(u, k, iters=iters, seed=seed, device=device)
    import faiss  # imported here: the keep rule and the report need no FAISS

    km = faiss.Kmeans(
        u.shape[1],
        k,
        niter=iters,
        spherical=True,
        seed=seed,
        verbose=False,
        # we already sampled (by key hash); stop FAISS from subsampling again or warning about it
        max_points_per_centroid=len(u) // k + 1,
        min_points_per_centroid=1,
    )
    km.train(u)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def torch_kmeans(
    u: np.ndarray, k: int, *, iters: int = 10, seed: int = 0, device: str = "cuda", chunk: int = 16384
) -> np.ndarray:
    """Spherical Lloyd k-means in torch. u: (S, D) float32 unit rows -> (k, D) float32 unit centroids.

    For a GPU, where FAISS's CPU k-means would dominate a large dedup: the sample and the centroids
    stay on the device and every step is deterministic, so a seed gives the same centroids on the same
    device, run after run. Start: k distinct rows drawn by a seeded numpy generator (not FAISS's draw).
    Each iteration: nearest centroid by float32 products (ties to the lower id), then each centroid =
    the normalised float64 sum of its members, summed slice by slice in row order (no atomics); a
    centroid left empty takes the row its own centroid represents worst (lowest cosine, ties to the
    lower row), each such row once.
    """
    import torch

    dev = torch.device(device)
    s, _ = u.shape
    k = max(1, min(int(k), s))
    x = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32)).to(dev)
    start = np.sort(np.random.default_rng(seed).choice(s, size=k, replace=False))
    c = x[torch.from_numpy(start).to(dev)].clone()
    for _ in range(max(0, int(iters))):
        labels = torch.empty(s, dtype=torch.int64, device=dev)
        best = torch.empty(s, dtype=torch.float32, device=dev)
        for a in range(0, s, chunk):
            best[a : a + chunk], labels[a : a + chunk] = (x[a : a + chunk] @ c.T).max(dim=1)
        order = torch.sort(labels, stable=True).indices
        counts = torch.bincount(labels, minlength=k).cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        xs = x[order]
        full = np.flatnonzero(counts)
        sums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=dev)
        sums[torch.from_numpy(full).to(dev)] = torch.stack(
            [xs[bounds[j] : bounds[j + 1]].sum(dim=0, dtype=torch.float64) for j in full.tolist()]
        )
        del xs
        empty = np.flatnonzero(counts == 0)
        norms = sums.norm(dim=1, keepdim=True)
        c = (sums / norms.clamp_min(1e-300)).float()
        if len(empty):
            worst = torch.sort(best, stable=True).indices[: len(empty)]
            c[torch.from_numpy(empty).to(dev)] = x[worst]
    return np.ascontiguousarray(c.cpu().numpy(), dtype=np.float32)
