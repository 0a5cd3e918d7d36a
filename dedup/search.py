"""Vectors -> above-threshold pairs: canonical cosines, k-means on a hashed sample, assignment, block search.

Every function here takes raw descriptors (any scale, float16/32/64, memory-mapped is fine) and
normalises them itself, exactly once, with `unit_rows`. Reduced-precision or multi-threaded matrix
products only *propose* candidate pairs, with a margin that bounds their rounding error; membership
is decided by `exact_dots`, a per-pair float64 dot product of the canonical float32 unit vectors,
rounded to float32 and compared with `> float32(threshold)`. So the pair set never depends on thread
count, block size, BLAS, device or input order (DESIGN.md "Dedup").

The pieces a distributed runner needs, each deterministic per row or per pair:
`in_kmeans_sample` -> `train_centroids` -> `assign_clusters` -> `search_cluster` (or, for a cluster
too big for one worker, `block_pairs` + `search_block_pair`). `find_pairs` chains them in one process.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from flowcurate.formats.hashing import fraction_cut, hasher, stable_hash

# Candidate margins: an upper bound on |product-in-this-precision - true cosine| for unit vectors in
# D <= 2048 dimensions, so that "candidate > t - margin" can never miss a pair with cosine > t.
# fp32 (IEEE sgemm): |error| <= D * 2^-24 * sum|a_k b_k| <= D * 2^-24 (Cauchy-Schwarz); see fp32_margin.
# tf32 / fp16 / bf16 round each input to 11 / 11 / 8 significant bits (2u per product, u = 2^-p),
# plus output rounding and a reduced-precision split-K reduction (up to ~4u) that cuBLAS may use.
# int8 (fbgemm): the bound is computed per block from the actual quantisation error (`_Int8Block`).
MARGINS = {"fp32": 1.5e-4, "tf32": 5e-3, "fp16": 5e-3, "bf16": 4e-2, "int8": 0.0}


def fp32_margin(d: int) -> float:
    """Twice the sgemm error bound D * 2^-24 for D-dim unit vectors (assignment compares two
    approximate scores), and never below 1.5e-4."""
    return max(MARGINS["fp32"], 2.5 * d * 2.0**-24)


# Rows per block of a matrix product: 2048 x 2048 float32 similarities are 16 MiB per thread.
BLOCK_ROWS = 2048

ProgressFn = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------- canonical numbers


def row_norms(x: np.ndarray, block_rows: int = 4096, threads: int | None = None) -> np.ndarray:
    """x: (N, D) any float dtype, may be a memmap -> (N,) float64 L2 norms (NaN/inf for bad rows).

    Row blocks on a thread pool (numpy releases the GIL): each norm is a per-row float64 sum, so the
    result does not depend on the block size or the thread count (10M x 512 on one thread: ~1 min).
    Memory: two float64 blocks per thread (4096 x 512: 32 MiB each)."""
    out = np.empty(len(x), dtype=np.float64)

    def work(s: int) -> None:
        b = np.asarray(x[s : s + block_rows], dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            out[s : s + len(b)] = np.sqrt((b * b).sum(axis=1))

    for _ in _pool_map(work, range(0, len(x), block_rows), threads):
        pass
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x: (B, D) raw descriptors -> (B, D) float32 canonical unit vectors.

    Normalised in float64, one row at a time in effect (nothing depends on the other rows), so every
    worker gets bit-identical vectors for the same input row. Rows must have a finite, nonzero norm.
    """
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=1))
    return (x64 / norms[:, None]).astype(np.float32)


def exact_dots(ua: np.ndarray, ub: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """ua, ub: (P, D) float32 unit rows -> (P,) float32 cosines ua[p] . ub[p].

    float32 x float32 products are exact in float64; the float64 sum runs in numpy's fixed order for
    each row, and the result is rounded once to float32. No BLAS, no threads: deterministic.
    """
    out = np.empty(len(ua), dtype=np.float32)
    for s in range(0, len(ua), chunk):
        a = ua[s : s + chunk].astype(np.float64)
        out[s : s + len(a)] = (a * ub[s : s + chunk].astype(np.float64)).sum(axis=1)
    return out


def pair_cosines(embeddings: np.ndarray, pairs: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """embeddings: (N, D) raw; pairs: (P, 2) row indices -> (P,) float32 canonical cosines."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out = np.empty(len(pairs), dtype=np.float32)
    for s in range(0, len(pairs), chunk):
        p = pairs[s : s + chunk]
        out[s : s + len(p)] = exact_dots(unit_rows(embeddings[p[:, 0]]), unit_rows(embeddings[p[:, 1]]))
    return out


def above(cos: np.ndarray, threshold: float) -> np.ndarray:
    """The one threshold test everywhere: strict `>`, in float32 (DESIGN.md: strict, float32)."""
    return np.asarray(cos, dtype=np.float32) > np.float32(threshold)


# ----------------------------------------------------------------------------- k-means sample


def in_kmeans_sample(key: str, fraction: float) -> bool:
    """Whether `key` belongs to the k-means training sample: a pure function of (key, fraction)."""
    return stable_hash("kmeans_sample", key) < fraction_cut(fraction)


def _sample_rows(rows: np.ndarray, keys: Sequence[str], fraction: float) -> np.ndarray:
    """The rows whose key `in_kmeans_sample`: the same hash and cut, the call inlined (10M keys: ~1.6x
    faster)."""
    cut, h = fraction_cut(fraction), hasher("kmeans_sample")
    return np.array(
        [r for r in rows.tolist() if h(keys[r]) < cut],
        dtype=np.int64,
    )


def kmeans_sample_fraction(n_items: int, n_clusters: int, kmeans_sample: int) -> float:
    """Fraction of items to train on: about `kmeans_sample`, and at least 40 per centroid (FAISS
    warns below 39 per centroid; Clustering.cpp)."""
    if n_items <= 0:
        return 1.0
    return min(1.0, max(kmeans_sample, 40 * n_clusters) / n_items)


EXACT_BELOW = 20_000  # "auto" searches all pairs up to this many items (2e8 pairs: seconds)
# ... and on a GPU up to this many: exact 1M took 3.7 s and 2M 13 s on an H200 (BENCHMARKS.md), so
# 4M is about a minute, at 100 % recall, where clustered mode recalls ~98 % above cosine 0.8
EXACT_BELOW_DEVICE = 4_000_000


def auto_clusters(n_items: int, device: bool = False) -> int:
    """Default k: one cluster (exact search) up to EXACT_BELOW items (EXACT_BELOW_DEVICE when the
    search runs on a GPU, `device`), else about 4 sqrt(N).

    Measured at 1M x 512 (clustered generator of benchmarks/dedup_bench.py, planted pairs): at equal
    search work, more and smaller clusters with more assignments recall more than fewer, larger ones:
    k = 1000, top-3 m.1: .59 / .78 / .95 (cosine 0.7-0.8 / 0.8-0.9 / 0.9-1) at 7.6e9 pairs;
    k = 2000, top-8 m.1: .91 / .98 / 1.0 at 30e9; k = 4000, top-8 m.1: .92 / .98 / 1.0 at 13.7e9,
    top-10 m.1: .95 / .99 / 1.0 at 20e9. k-means and assignment cost grow with k (~95 s and ~45 s on
    2 cores at k = 4000), which is where 4 sqrt(N) stops paying (BENCHMARKS.md)."""
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
    centroid update loops over points in order per centroid range; we checked 1 vs 2 threads bit for
    bit). device "cuda" (or any torch device): `torch_kmeans` there, deterministic for a fixed seed on
    one device, but not the same centroids as FAISS. k is capped at the sample size. k = 1 skips both:
    the centroid is the normalised mean.
    """
    order = np.asarray(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
    # normalised in blocks (unit_rows is per row, so bit-identical): a whole-sample float64 copy made
    # k-means the peak of anonymous memory (1.75 GB at 100k, BENCHMARKS.md)
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

    For a GPU, where FAISS's CPU k-means was 80 % of a 3M-row dedup (BENCHMARKS.md): the sample and
    the centroids stay on the device and every step is deterministic, so a seed gives the same
    centroids on the same device, run after run. Start: k distinct rows drawn by a seeded numpy
    generator (not FAISS's draw: the centroids differ from `train_centroids`' FAISS path). Each
    iteration: nearest centroid by float32 products (ties to the lower id), then each centroid = the
    normalised float64 sum of its members, summed slice by slice in row order (no atomics); a centroid
    left empty takes the row its own centroid represents worst (lowest cosine, ties to the lower
    row), each such row once.
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


# ----------------------------------------------------------------------------- assignment


def _assign_block(u: np.ndarray, centroids: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    s = u @ centroids.T  # BLAS: only proposes; rescored exactly below
    kth = -np.partition(-s, top - 1, axis=1)[:, top - 1]
    rows, cols = np.nonzero(s >= (kth - fp32_margin(u.shape[1]))[:, None])
    return _rescore(u, centroids, rows, cols, top)


def _rescore(
    u: np.ndarray, centroids: np.ndarray, rows: np.ndarray, cols: np.ndarray, top: int
) -> tuple[np.ndarray, np.ndarray]:
    """Proposed (row, centroid) pairs -> each row's `top` best by a float64 dot product, ties to the
    lower centroid id. The result is the same for every proposal set that contains each row's true
    top (any proposer whose error is within the margin: BLAS here, a GPU in `_DeviceAssign`)."""
    exact = (u[rows].astype(np.float64) * centroids[cols].astype(np.float64)).sum(axis=1)
    order = np.lexsort((cols, -exact, rows))  # per row: best first, ties by centroid id
    rows, cols, exact = rows[order], cols[order], exact[order]
    pos = np.arange(len(rows)) - np.searchsorted(rows, rows)
    keep = pos < top
    ids = np.full((len(u), top), -1, dtype=np.int32)
    sims = np.full((len(u), top), np.nan, dtype=np.float32)
    ids[rows[keep], pos[keep]] = cols[keep]
    sims[rows[keep], pos[keep]] = exact[keep]
    return ids, sims


# Recall mitigation, measured (N=100k, D=512, t=0.5, 5 % planted pairs at cos U(0.7, 0.95), the
# env_probe.md §4 generators; recall of planted pairs whose ends are both outside the k-means sample,
# 20 % sample; "work" = sum of cluster sizes^2 / 2 in millions of pairs):
#   k=316      top-1       top-2       top-3       top-3 m.1   top-4       top-4 m.1
#   uniform    .311 (16)   .623 (63)   .800 (143)  .800 (135)  .891 (253)  .891 (235)
#   clustered  .865 (17)   .937 (65)   .970 (144)  .969 (37)   .983 (255)  .983 (49)
#   k=1000: uniform .266/.542/.725/.827 for top-1..4 (5/20/45/80); clustered .965/.991/.992/.994, and
#   top-4 m.1 kept .994 at 7M pairs (1.17 assignments per item).
# At equal work, more assignments beat bigger clusters (uniform k=80 top-1: .42 recall at 63M pairs,
# k=316 top-2: .62). The margin (m.1: keep a further centroid only within 0.1 of the best) cost no
# recall and saved 1-5x work where the data has structure; 0.05 lost ~1 point on uniform data.
def assign_clusters(
    vectors: np.ndarray,
    centroids: np.ndarray,
    assign: int = 8,
    *,
    assign_margin: float | None = 0.1,
    block_rows: int = 4096,
    threads: int | None = None,
    engine: Engine | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `assign` nearest centroids. vectors: (B, D) raw (finite, nonzero rows);
    centroids: (k, D) -> ids (B, a) int32, sims (B, a) float32, a = min(assign, k), best first.

    Column 0 is the top-1 cluster (the manifest's `cluster`). With `assign_margin`, a further centroid
    is kept only if its cosine is within the margin of the best one (adaptive multi-assignment);
    dropped entries are -1 / NaN. Deterministic per row: BLAS proposes centroids within a margin of
    the a-th best, a float64 dot product ranks them, ties go to the lower centroid id. With an
    `engine` whose `on_device` is true (torch on a GPU), the device proposes instead (float64
    products); the ranking is the same host code, so ids and sims are identical.
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    top = max(1, min(int(assign), len(centroids)))
    if engine is not None and engine.on_device:
        # the device proposes, the host rescores (`_rescore`): per block, host memory ~ rows x
        # (top + 1) x D x 32 bytes (512 rows, top 8, 512-d: ~70 MiB per thread)
        block_rows = max(64, min(block_rows, 512))
        propose = _DeviceAssign(engine, centroids, top)

        def block(u: np.ndarray):
            return _rescore(u, centroids, *propose(u), top)
    else:
        # keep the (rows x k) similarity block near 64 MiB
        block_rows = max(64, min(block_rows, (1 << 24) // max(1, len(centroids))))

        def block(u: np.ndarray):
            return _assign_block(u, centroids, top)

    ids = np.empty((len(vectors), top), np.int32)
    sims = np.empty((len(vectors), top), np.float32)

    def work(s: int) -> None:  # fills its rows in place: no second copy of ids / sims
        ids[s : s + block_rows], sims[s : s + block_rows] = block(unit_rows(vectors[s : s + block_rows]))

    for _ in _pool_map(work, range(0, len(vectors), block_rows), threads):
        pass
    if assign_margin is not None and top > 1:
        far = sims[:, 1:] < sims[:, :1] - np.float32(assign_margin)
        ids[:, 1:][far] = -1
        sims[:, 1:][far] = np.nan
    return ids, sims


def group_members(ids: np.ndarray, rows: np.ndarray, n_clusters: int) -> list[np.ndarray]:
    """ids: (B, a) from `assign_clusters` for the items `rows` (B,) -> per cluster, its member rows,
    ascending (so memory-mapped reads are sequential); views into one int64 array.

    One int64 code per (item, cluster) entry, cluster * M + row, sorted in place: the codes are unique
    (an item's clusters are distinct), so the order is cluster, then row. Unused entries (-1) get a
    code past the last cluster and sort to the end. Peak memory is that one array (10M items x 8:
    0.6 GB); the earlier repeat/filter/argsort/gather chain held ~2.9 GB at 10M (BENCHMARKS.md).
    """
    rows = np.asarray(rows, dtype=np.int64)
    m = int(rows.max()) + 1 if len(rows) else 1
    if n_clusters * m >= 2**62:
        raise ValueError(f"{n_clusters} clusters x {m} rows do not fit int64 codes")
    codes = np.empty(ids.shape, dtype=np.int64)
    codes[:] = ids
    np.copyto(codes, n_clusters, where=ids < 0)
    codes *= m
    codes += rows[:, None]
    codes = codes.reshape(-1)
    codes.sort()
    bounds = np.searchsorted(codes, np.arange(n_clusters + 1, dtype=np.int64) * m).tolist()
    codes %= m  # codes -> rows, in place
    return [codes[bounds[c] : bounds[c + 1]] for c in range(n_clusters)]


# ----------------------------------------------------------------------------- block search


class Engine:
    """Where candidate matrix products run; the pair set is the same for every engine.

    backend "numpy": float32 BLAS on the CPU, blocks spread over a thread pool (one BLAS thread each).
    backend "torch": `device` (e.g. "cuda") and `precision` fp32 | tf32 | fp16 | bf16, or int8 on an
    x86 CPU (fbgemm), run in the calling thread with torch's own threads. Blocks with fewer than
    `min_rows` rows use numpy fp32 (conversion overheads dominate).

    Measured on the 2-core AMD EPYC (AVX2, no AMX/VNNI) dev box: the int8 product is ~1.26x an fp32
    one at 2048 rows, but with quantising and re-checks whole exact runs break even (40k: 1.17x, 100k:
    0.96x; BENCHMARKS.md), and torch bf16/fp16 on this CPU are emulated (6-8x slower than fp32). On an
    AMX Xeon, numpy fp32 was as fast as bf16 and 2.3x int8. So int8 and bf16 stay opt-in.

    `resident` (torch, not int8): `find_pairs_in_groups` normalises every row once onto the device and
    multiplies tiles of any group there, collecting candidate indices on the device (one host sync per
    tile of `DEVICE_TILE` products), then re-checks them on the host; `assign_clusters` lets the device
    propose centroids. None (default): on any non-CPU device, when the rows fit its memory; True also
    on the CPU (tests); False: the block path below. `min_rows` does not apply there.
    """

    def __init__(
        self,
        backend: str = "numpy",
        device: str = "cpu",
        precision: str = "fp32",
        min_rows: int = 1024,
        resident: bool | None = None,
    ):
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        if precision not in MARGINS or (backend == "numpy" and precision != "fp32"):
            raise ValueError(f"precision {precision!r} is not available with backend {backend!r}")
        if precision == "int8" and not (str(device).startswith("cpu") and int8_available()):
            raise ValueError("int8 needs torch's x86 (fbgemm) quantized engine on a CPU device")
        self.backend, self.device, self.precision, self.min_rows = backend, str(device), precision, min_rows
        self.resident = resident
        # fp32 on CUDA may silently run as TF32 (a global torch flag): use the TF32 bound there
        cuda_fp32 = backend == "torch" and precision == "fp32" and not self.device.startswith("cpu")
        self.margin = MARGINS["tf32" if cuda_fp32 else precision]

    @staticmethod
    def auto(device: str = "cpu") -> Engine:
        """numpy fp32 on the CPU; torch fp16 on any other device (e.g. "cuda")."""
        return Engine() if str(device).startswith("cpu") else Engine("torch", device, "fp16")

    def __repr__(self) -> str:
        return f"Engine({self.backend!r}, {self.device!r}, {self.precision!r})"

    @property
    def on_device(self) -> bool:
        """Whether search and assignment take the device-resident path (see the class docstring)."""
        if self.backend != "torch" or self.precision == "int8" or self.resident is False:
            return False
        return bool(self.resident) or not self.device.startswith("cpu")

    def prepare(self, u: np.ndarray) -> Block:
        """u: (B, D) unit rows -> the block with this engine's form of it (cacheable; either side)."""
        if self.backend == "numpy":
            return Block(u, u, u.nbytes)
        if self.precision == "int8":
            return Block(u, _Int8Block(u), u.nbytes * 9 // 4)
        import torch

        dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        return Block(u, torch.from_numpy(u).to(self.device, dtype[self.precision]), u.nbytes * 2)

    def candidates(self, pa, pb, threshold: float, same: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """pa, pb: `Block.data` of two blocks (pb ignored when `same`: the upper triangle of pa pa^T) ->
        (ia, ib) int64, a superset of the pairs with cosine > threshold; None when the block is so
        dense near the threshold that an fp32 pass is cheaper than re-checking (int8 only)."""
        t32 = float(np.float32(threshold))
        pb = pa if same else pb
        if self.backend == "numpy":
            mask = (pa @ pb.T) > np.float32(t32 - fp32_margin(pa.shape[1]))
        elif self.precision == "int8":
            mask = pa.product(pb).numpy() > np.float32(t32 - pa.margin_with(pb))
        else:  # compare in float32: the threshold itself must not be rounded to fp16/bf16
            import torch

            # the mask stays on the device: only the (few) candidate indices cross to the host, in
            # row-major order like flatnonzero below (copying a block's mask costs more than its product)
            hit = (pa @ pb.T).float() > t32 - self.margin
            idx = torch.nonzero(torch.triu(hit, diagonal=1) if same else hit).cpu().numpy()
            return idx[:, 0].astype(np.int64), idx[:, 1].astype(np.int64)
        # flatnonzero + divmod: 2-D np.nonzero is ~50x slower on a sparse mask; filtering i < j
        # afterwards is cheaper than masking the lower triangle first
        ia, ib = np.divmod(np.flatnonzero(mask), mask.shape[1])
        if same:
            upper = ia < ib
            ia, ib = ia[upper], ib[upper]
        if self.precision == "int8" and len(ia) > max(1024, mask.size // 500):
            return None  # re-checks cost ~100 int8 products each: recompute this block in fp32
        return ia.astype(np.int64), ib.astype(np.int64)


class Block(NamedTuple):
    """A block of canonical unit rows u: (B, D) float32, with an engine's form of it."""

    u: np.ndarray
    data: object
    nbytes: int  # host memory held (for the block cache's budget)


class _Int8Block:
    """A block of unit rows for fbgemm's int8 GEMM, with the exact size of its rounding error.

    Left side (the "input"): per-block scale, values k in [-63, 63] (u8 = k + 64 in [1, 127]: AVX2's
    vpmaddubsw adds two u8*s8 products in int16, and 2*127*127 < 32767, so nothing saturates). We pass
    float32 values exactly on that grid, so fbgemm's own rounding gives back our k. Right side (the
    packed "weight"): per-row scale, int8 in [-127, 127]. int32 accumulation is exact, so
    |a.b - out| <= |e_a| |b| + |a_q| |e_b| (Cauchy-Schwarz) with e = u - u_q known per row.
    """

    def __init__(self, u: np.ndarray):
        import torch

        u64 = u.astype(np.float64)
        self.sx = max(float(np.abs(u).max()), 1e-30) / 63
        xq = (np.rint(u64 / self.sx) * self.sx).astype(np.float32)
        self.x = torch.from_numpy(xq)
        self.err_x = float(np.sqrt(((u64 - xq) ** 2).sum(axis=1)).max())
        self.u = u
        self._packed = None

    def packed(self):
        if self._packed is None:
            import torch

            u64 = self.u.astype(np.float64)
            sw = np.maximum(np.abs(u64).max(axis=1), 1e-30) / 127
            k = np.rint(u64 / sw[:, None])
            self.err_w = float(np.sqrt(((u64 - k * sw[:, None]) ** 2).sum(axis=1)).max())
            with (
                warnings.catch_warnings()
            ):  # quantized tensors are deprecated API in torch 2.13 (pinned < 2.14)
                warnings.simplefilter("ignore")
                q = torch._make_per_channel_quantized_tensor(
                    torch.from_numpy(k.astype(np.int8)),
                    torch.from_numpy(sw),
                    torch.zeros(len(k), dtype=torch.int64),
                    0,
                )
                self._packed = torch.ops.quantized.linear_prepack(q, None)
        return self._packed

    def product(self, other: _Int8Block):
        import torch

        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            self.x, self.sx, 64, other.packed()
        )

    def margin_with(self, other: _Int8Block) -> float:
        other.packed()
        # |x_q| <= 1 + err_x; 1e-5 covers the float32 scaling of the int32 result and |u| = 1 +- 1e-7
        return self.err_x + (1 + self.err_x) * other.err_w + 1e-5


_INT8_OK: bool | None = None


def int8_available() -> bool:
    """torch with the x86 quantized engine, checked once on adversarial blocks against float64."""
    global _INT8_OK
    if _INT8_OK is None:
        try:
            import torch

            if torch.backends.quantized.engine not in ("x86", "fbgemm"):
                raise RuntimeError(torch.backends.quantized.engine)
            rng = np.random.default_rng(0)
            u = unit_rows(rng.standard_normal((96, 512)))
            u[:8] = unit_rows(np.sign(rng.standard_normal((8, 512))))  # every product at the extremes
            u[8:12] = u[:4]
            u[12:16] = -u[:4]
            blk = _Int8Block(u)
            out = blk.product(blk).numpy().astype(np.float64)
            err = np.abs(out - u.astype(np.float64) @ u.T.astype(np.float64))
            _INT8_OK = bool(err.max() <= blk.margin_with(blk))
        except Exception:  # no torch, no fbgemm, or an op that changed: fp32 it is
            _INT8_OK = False
    return _INT8_OK


_FP32 = Engine()


def make_engine(backend: str = "auto", device: str = "cpu", precision: str = "auto") -> Engine:
    """backend "auto" | "numpy" | "torch"; precision "auto" or a key of MARGINS. auto: `Engine.auto`."""
    if backend == "auto" and precision == "auto":
        return Engine.auto(device)
    if precision == "auto":
        precision = "fp32" if backend == "numpy" else Engine.auto(device).precision
    if backend == "auto":
        backend = "numpy" if precision == "fp32" and str(device).startswith("cpu") else "torch"
    return Engine(backend, device, precision)


def search_block_pair(
    ua: np.ndarray, ub: np.ndarray | None, threshold: float, engine: Engine | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ua: (A, D), ub: (B, D) canonical unit rows (`unit_rows`), or ub None to search ua against itself
    (i < j) -> ia (P,), ib (P,) int64 local indices and cos (P,) float32: exactly the pairs with
    canonical cosine > threshold."""
    engine = _pick(engine or _FP32, len(ua))
    return _check(engine.prepare(ua), None if ub is None else engine.prepare(ub), threshold, engine)[:3]


def _pick(engine: Engine, rows: int) -> Engine:
    return engine if rows >= engine.min_rows else _FP32


def _check(pa: Block, pb: Block | None, threshold: float, engine: Engine):
    """Candidates from `engine` for blocks pa, pb (None: pa against itself), then the exact re-check."""
    same = pb is None
    pb = pa if same else pb
    cand = engine.candidates(pa.data, pb.data, threshold, same)
    if cand is None:  # dense near the threshold: an fp32 pass has far fewer candidates
        cand = _FP32.candidates(pa.u, pb.u, threshold, same)
    ia, ib = cand
    cos = exact_dots(pa.u[ia], pb.u[ib])
    keep = above(cos, threshold)
    return ia[keep], ib[keep], cos[keep], len(ia)


def block_pairs(n_rows: int, block_rows: int = BLOCK_ROWS) -> list[tuple[int, int]]:
    """Split an (n x n) upper triangle into block tasks (a, b), a <= b, row-block indices of size
    `block_rows`: how a cluster too big for one worker is spread out."""
    nb = max(1, -(-n_rows // block_rows))
    return [(a, b) for a in range(nb) for b in range(a, nb)]


def _pool_map(fn, items, threads: int | None):
    """Ordered map over a thread pool (numpy's BLAS releases the GIL). threads=1: plain loop."""
    threads = threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # one BLAS thread per block: the pool is the parallelism (OpenBLAS with 2 threads on small calls
    # is 10-40x slower here, env_probe.md)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        yield from pool.map(fn, items)


def find_pairs_in_groups(
    embeddings: np.ndarray,
    groups: Sequence[np.ndarray],
    threshold: float,
    *,
    block_rows: int = BLOCK_ROWS,
    engine: Engine | None = None,
    threads: int | None = None,
    cache_bytes: int = 1 << 30,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """All pairs with canonical cosine > threshold that share a group.

    embeddings: (N, D) raw, may be a memmap (a task holds its row block in float32 and reads the
    others one at a time; prepared blocks of split groups are cached up to `cache_bytes`);
    groups: row-index arrays (clusters; one group of all rows = exact search). Groups larger than
    `block_rows` are split into row blocks over the upper triangle.
    -> pairs (P, 2) int64 (i < j, sorted, unique), cos (P,) float32, stats.
    With an `Engine.on_device` engine, all rows go to the device once and the products run there
    (`_device_pairs`); the pair set and cosines are the same.
    """
    engine = engine or _FP32
    if engine.on_device:
        out = _device_pairs(embeddings, groups, threshold, engine, block_rows, threads, progress)
        if out is not None:
            return out
    tasks = []  # (group, row-block a, number of row blocks): block a against blocks a..end
    for g, rows in enumerate(groups):
        if len(rows) >= 2:
            nb = -(-len(rows) // block_rows)
            tasks += [(g, a, nb) for a in range(nb)]
    # biggest tasks first so the pool does not end on one long straggler
    tasks.sort(key=lambda t: -(t[2] - t[1]) * min(block_rows, len(groups[t[0]])) ** 2)
    cache: dict = {}  # (group, block, engine) -> Block, for groups split into several blocks
    budget = [cache_bytes]

    def block(g, b, eng):
        rows = np.asarray(groups[g], dtype=np.int64)[b * block_rows : (b + 1) * block_rows]
        key = (g, b, id(eng))
        if key not in cache:
            blk = eng.prepare(unit_rows(embeddings[rows]))
            if len(groups[g]) <= block_rows or budget[0] < blk.nbytes:
                return rows, blk
            budget[0] -= blk.nbytes
            cache[key] = blk
        return rows, cache[key]

    def group_engine(g):
        return _pick(engine, min(block_rows, len(groups[g])))

    def work(task):
        g, a, nb = task
        eng = group_engine(g)
        ra, pa = block(g, a, eng)
        out, n_cand = [], 0
        for b in range(a, nb):
            rb, pb = (ra, None) if b == a else block(g, b, eng)
            ia, ib, cos, n = _check(pa, pb, threshold, eng)
            out.append((ra[ia], rb[ib], cos))
            n_cand += n
        return out, n_cand

    # torch engines use torch's threads: run their tasks here, one at a time; numpy tasks in a pool
    own = [t for t in tasks if group_engine(t[0]).backend == "torch"]
    pooled = [t for t in tasks if group_engine(t[0]).backend == "numpy"]
    parts, n_candidates, done = [], 0, 0
    for out, n_cand in _chain(map(work, own), _pool_map(work, pooled, threads)):
        parts += out
        n_candidates += n_cand
        done += 1
        if progress:
            progress("search", done, len(tasks))
    if parts:
        i = np.concatenate([p[0] for p in parts])
        j = np.concatenate([p[1] for p in parts])
        cos = np.concatenate([p[2] for p in parts])
    else:
        i = j = np.zeros(0, np.int64)
        cos = np.zeros(0, np.float32)
    pairs, cos = unique_pairs(np.stack([i, j], axis=1), cos)
    # candidates: products the engine proposed (true pairs + its margin band), all re-checked exactly
    return pairs, cos, {"tasks": len(tasks), "candidates": n_candidates, "engine": repr(engine)}


# ----------------------------------------------------------------------------- device-resident path

# Products per device tile (row block x column chunk): 2^28 -> 512 MiB of fp16 and a 256 MiB mask.
DEVICE_TILE = 1 << 28
_TORCH_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _floor_in(x: float, dtype) -> float:
    """The largest value of the torch `dtype` that is <= x, as a float (exact in that dtype), so that
    `tile >= it`, compared in the tile's own precision, keeps every entry above x."""
    import torch

    c = torch.tensor([x], dtype=torch.float64).to(dtype)
    if float(c) > x:  # one step down on the bits (torch.nextafter lacks half types in some versions)
        bits = c.view(torch.int16 if c.element_size() == 2 else torch.int32)
        if float(c) > 0:
            bits -= 1
        elif float(c) < 0:
            bits += 1  # sign and magnitude: a larger magnitude
        else:  # +-0 > x: the smallest negative subnormal
            bits.fill_(-(1 << (8 * c.element_size() - 1)) + 1)
    return float(c)


def _device_units(x: np.ndarray, device, dtype, chunk: int = 65536):
    """x: (N, D) raw, may be a memmap -> (N, D) unit rows on the device in `dtype`.

    Normalised there in float64, rounded to float32 and then to `dtype`, as `unit_rows` would; the
    float64 norm may differ from the host's in its last bit (another summation order), so a float32
    value may differ by one unit in the last place: 2^-23 relative, far inside every engine's margin
    (fp32 1.5e-4 >= D 2^-24 + 2 * 2^-23). Rows with a zero or non-finite norm become NaN: never a
    candidate (groups hold valid rows anyway). Host reads run one chunk ahead on a thread.
    """
    import torch

    n, d = x.shape
    out = torch.empty((n, d), dtype=dtype, device=device)

    def read(s: int) -> np.ndarray:
        b = np.array(x[s : s + chunk])  # a copy: torch wants writable memory, memmaps are read-only
        return b if b.dtype in (np.float16, np.float32, np.float64) else b.astype(np.float64)

    for s, b in zip(range(0, n, chunk), _ahead(read, range(0, n, chunk))):
        t = torch.from_numpy(b).to(device).double()
        t = t / (t * t).sum(dim=1, keepdim=True).sqrt()
        out[s : s + len(b)] = t.float().to(dtype)
    return out


def _ahead(fn, items, depth: int = 2):
    """fn over items in order, up to `depth` calls running ahead on a thread (bounded memory)."""
    items = list(items)
    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(fn, it) for it in items[:depth]]
        for k in range(len(items)):
            res = futures[k].result()
            futures[k] = None  # release the result once consumed
            if k + depth < len(items):
                futures.append(pool.submit(fn, items[k + depth]))
            yield res


def _device_fits(device, nbytes: int) -> bool:
    """Whether `nbytes` of resident rows plus a few tiles fit the device's free memory."""
    import torch

    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes + 8 * DEVICE_TILE <= 0.8 * free


def _device_pairs(embeddings, groups, threshold, engine: Engine, block_rows, threads, progress):
    """`find_pairs_in_groups` with every row resident on the device; None if they do not fit.

    Each group is tiled into row blocks of `block_rows` against column chunks of up to
    DEVICE_TILE / block_rows rows of the same group (upper triangle only). A tile's product is
    compared there with the largest value of the product's dtype <= float32(t) - engine.margin, and
    only the candidate indices leave it, encoded as i * N + j (i < j), one transfer per ~1M. On the
    host: unique candidates (multi-assignment proposes a pair in every cluster both ends share),
    then the same exact re-check as everywhere (`exact_dots` of `unit_rows`), on a thread pool.
    """
    import torch

    device = torch.device(engine.device)
    dtype = getattr(torch, _TORCH_DTYPES[engine.precision])
    n, d = embeddings.shape
    if not _device_fits(device, n * d * torch.tensor([], dtype=dtype).element_size()):
        return None
    t0 = time.perf_counter()
    units = _device_units(embeddings, device, dtype)
    t1 = time.perf_counter()
    cut = _floor_in(float(np.float32(threshold)) - engine.margin, dtype)
    rb = max(1, int(block_rows))
    cb = max(rb, DEVICE_TILE // rb)
    n_tasks = sum(-(-len(g) // rb) for g in groups if len(g) >= 2)
    found: list[np.ndarray] = []  # host: candidate codes, compacted to unique ones now and then
    pending: list = []  # device: candidate codes not copied yet
    n_pending = n_found = n_cand = tiles = done = 0

    def flush():
        nonlocal pending, n_pending, n_found, found
        if pending:
            found.append(torch.cat(pending).cpu().numpy())
            n_found += n_pending
            pending, n_pending = [], 0
        if n_found > (1 << 25):  # bound host memory: duplicates out
            found = [np.unique(np.concatenate(found))]
            n_found = len(found[0])

    for rows in groups:
        m = len(rows)
        if m < 2:
            continue
        # a contiguous, writable int64 copy: torch takes neither negative strides nor read-only memory
        idx = torch.from_numpy(np.array(rows, dtype=np.int64)).to(device)
        for a0 in range(0, m, rb):
            a1 = min(m, a0 + rb)
            xa = units.index_select(0, idx[a0:a1])
            for c0 in range(a0, m, cb):
                c1 = min(m, c0 + cb)
                xc = xa if (c0, c1) == (a0, a1) else units.index_select(0, idx[c0:c1])
                nz = torch.nonzero((xa @ xc.T) >= cut)  # the one host sync per tile
                if c0 == a0:  # the tile holds the diagonal: local column j > local row i, each pair once
                    nz = nz[nz[:, 1] > nz[:, 0]]
                tiles += 1
                if len(nz):
                    gi, gj = idx[a0:a1][nz[:, 0]], idx[c0:c1][nz[:, 1]]
                    pending.append(torch.minimum(gi, gj) * n + torch.maximum(gi, gj))
                    n_pending += len(nz)
                    n_cand += len(nz)
                del nz
            if n_pending >= (1 << 20) or len(pending) >= 512:
                flush()
            done += 1
            if progress:
                progress("search", done, n_tasks)
    flush()
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    del units
    t2 = time.perf_counter()
    pairs, cos = _recheck_codes(embeddings, codes, n, threshold, threads)
    t3 = time.perf_counter()
    stats = {
        "tasks": n_tasks,
        "candidates": n_cand,
        "engine": repr(engine),
        "device": {
            "resident": True,
            "tiles": tiles,
            "unique_candidates": int(len(codes)),
            "t_upload": t1 - t0,
            "t_products": t2 - t1,
            "t_recheck": t3 - t2,
        },
    }
    return pairs, cos, stats


def _recheck_codes(embeddings, codes: np.ndarray, n: int, threshold: float, threads, chunk: int = 2048):
    """Sorted unique codes i * n + j -> pairs (P, 2), cos (P,) with canonical cosine > threshold, in
    (i, j) order: what `unique_pairs` gives for the same pairs (each cosine is per pair). Memory:
    ~chunk x D x 50 bytes per thread (2048 x 512: ~50 MiB)."""

    def work(s: int):
        c = codes[s : s + chunk]
        i, j = c // n, c % n
        cos = exact_dots(unit_rows(embeddings[i]), unit_rows(embeddings[j]))
        keep = above(cos, threshold)
        return i[keep], j[keep], cos[keep]

    parts = list(_pool_map(work, range(0, len(codes), chunk), threads))
    if not parts:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    pairs = np.stack([np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])], axis=1)
    return pairs, np.concatenate([p[2] for p in parts])


class _DeviceAssign:
    """Centroid proposals for `_rescore` from a torch device: products in float64 (float32 inputs are
    exact in it; the sum's error, ~D 2^-53, is far below fp32_margin), the top-`top` threshold per row
    and the candidates (row, centroid) within fp32_margin of it, like `_assign_block`. Both proposal
    sets contain every row's true top, so `_rescore` returns the same ids and sims."""

    def __init__(self, engine: Engine, centroids: np.ndarray, top: int):
        import torch

        self.device = torch.device(engine.device)
        self.centroids = torch.from_numpy(np.array(centroids, dtype=np.float64)).to(self.device)
        self.top, self.margin = top, fp32_margin(centroids.shape[1])

    def __call__(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        s = torch.from_numpy(u).to(self.device).double() @ self.centroids.T
        kth = torch.topk(s, self.top, dim=1).values[:, -1:]
        idx = torch.nonzero(s >= kth - self.margin).cpu().numpy()
        return idx[:, 0], idx[:, 1]


def _chain(*iterables):
    for it in iterables:
        yield from it


def unique_pairs(pairs: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pairs: (P, 2) int64, cos: (P,) -> the same set with i < j, sorted by (i, j), each pair once
    (multi-assignment finds a pair in every cluster the two items share; its cosine is identical)."""
    pairs = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs, cos = pairs[order], np.asarray(cos, dtype=np.float32)[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    return pairs[first], cos[first]


def search_cluster(
    vectors: np.ndarray,
    threshold: float,
    *,
    block_rows: int = BLOCK_ROWS,
    engine: Engine | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One cluster's members, all against all. vectors: (M, D) raw -> pairs (P, 2) int64 local
    indices (i < j, sorted), cos (P,) float32: exactly the member pairs with cosine > threshold."""
    pairs, cos, _ = find_pairs_in_groups(
        vectors, [np.arange(len(vectors))], threshold, block_rows=block_rows, engine=engine, threads=threads
    )
    return pairs, cos


def find_pairs(
    embeddings: np.ndarray,
    keys: Sequence[str],
    threshold: float,
    valid: np.ndarray | None = None,
    *,
    exact: bool = False,
    clusters: int | str = "auto",
    assign: int = 8,
    assign_margin: float | None = 0.1,
    kmeans_iters: int = 10,
    kmeans_sample: int = 100_000,
    kmeans: str = "auto",
    seed: int = 0,
    block_rows: int = BLOCK_ROWS,
    engine: Engine | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The whole search in one process.

    embeddings: (N, D) raw; keys: (N,); valid: (N,) bool rows to search (default all).
    -> pairs (P, 2) int64 row indices (i < j, sorted), cos (P,) float32, assignment (N, a) int32
    cluster ids (-1: none; invalid rows all -1), stats (timings in seconds, sizes).
    exact=True, or one cluster, searches all valid rows against each other: 100 % recall.
    kmeans: "faiss" (CPU), "torch" (`torch_kmeans` on the engine's torch device, or the CPU), or
    "auto": torch when the engine runs on a GPU, else FAISS. clusters "auto": `auto_clusters`, with
    the GPU's larger exact range when the engine runs on one.
    """
    n = len(embeddings)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rows = np.flatnonzero(valid)
    gpu = engine is not None and engine.backend == "torch" and not engine.device.startswith("cpu")
    if kmeans not in ("auto", "faiss", "torch"):
        raise ValueError(f"kmeans must be 'auto', 'faiss' or 'torch', got {kmeans!r}")
    if kmeans == "torch" or (kmeans == "auto" and gpu):
        kmeans_device = engine.device if engine is not None and engine.backend == "torch" else "cpu"
    else:
        kmeans_device = None
    k = auto_clusters(len(rows), device=gpu) if clusters == "auto" else max(1, int(clusters))
    if exact:
        k = 1
    stats: dict = {"n_valid": int(len(rows)), "threshold": float(threshold)}
    t0 = time.perf_counter()
    if k == 1:
        assignment = np.full((n, 1), -1, dtype=np.int32)
        assignment[rows, 0] = 0
        groups = [rows]
        stats.update(n_clusters=1, sample=0)
    else:
        fraction = kmeans_sample_fraction(len(rows), k, kmeans_sample)
        sample = _sample_rows(rows, keys, fraction)
        if progress:
            progress("kmeans", 0, 1)
        centroids = train_centroids(
            embeddings[sample],
            [keys[r] for r in sample],
            k,
            iters=kmeans_iters,
            seed=seed,
            device=kmeans_device,
        )
        k = len(centroids)
        if progress:
            progress("kmeans", 1, 1)
        stats.update(
            n_clusters=k,
            sample=int(len(sample)),
            kmeans="faiss" if kmeans_device is None else f"torch:{kmeans_device}",
            t_kmeans=time.perf_counter() - t0,
        )
        t1 = time.perf_counter()
        ids, _ = assign_clusters(
            _Rows(embeddings, rows),
            centroids,
            assign,
            assign_margin=assign_margin,
            threads=threads,
            engine=engine,
        )
        assignment = np.full((n, ids.shape[1]), -1, dtype=np.int32)
        assignment[rows] = ids
        groups = group_members(ids, rows, k)
        stats.update(
            t_assign=time.perf_counter() - t1, assignments_per_item=float((ids >= 0).sum() / max(1, len(ids)))
        )
    sizes = [len(g) for g in groups]
    stats.update(largest_cluster=max(sizes, default=0), pairwise_work=float(sum(s * s for s in sizes)) / 2)
    t2 = time.perf_counter()
    pairs, cos, s_stats = find_pairs_in_groups(
        embeddings,
        groups,
        threshold,
        block_rows=block_rows,
        engine=engine,
        threads=threads,
        progress=progress,
    )
    stats.update(s_stats, t_search=time.perf_counter() - t2, n_pairs=int(len(pairs)))
    return pairs, cos, assignment, stats


class _Rows:
    """A lazy row subset of a (memory-mapped) array: `_Rows(x, rows)[a:b]` reads only those rows,
    so assignment never materialises a copy of a large memmap."""

    def __init__(self, x: np.ndarray, rows: np.ndarray):
        self.x, self.rows = x, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl):
        return self.x[self.rows[sl]]
