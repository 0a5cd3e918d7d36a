"""The canonical numbers of dedup: unit rows, cosines, the one threshold test, margins.

Every search function takes raw descriptors (any scale, float16/32/64, memory-mapped is fine) and
normalises them itself, exactly once, with `unit_rows`. Reduced-precision or multi-threaded matrix
products only *propose* candidate pairs, with a margin that bounds their rounding error; membership
is decided by `exact_dots`, a per-pair float64 dot product of the canonical float32 unit vectors,
rounded to float32 and compared with `> float32(threshold)`. So the pair set never depends on thread
count, block size, BLAS, device or input order (docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Candidate margins: an upper bound on |product-in-this-precision - true cosine| for unit vectors in
# D <= 2048 dimensions, so that "candidate > t - margin" can never miss a pair with cosine > t.
# fp32 (IEEE sgemm): |error| <= D * 2^-24 * sum|a_k b_k| <= D * 2^-24 (Cauchy-Schwarz); see fp32_margin.
# tf32 / fp16 / bf16 round each input to 11 / 11 / 8 significant bits (2u per product, u = 2^-p),
# plus output rounding and a reduced-precision split-K reduction (up to ~4u) that cuBLAS may use.
MARGINS = {"fp32": 1.5e-4, "tf32": 5e-3, "fp16": 5e-3, "bf16": 4e-2}

# Rows per block of a matrix product: 2048 x 2048 float32 similarities are 16 MiB per thread.
BLOCK_ROWS = 2048

ProgressFn = Callable[[str, int, int], None]  # progress(stage, done, total)


def fp32_margin(d: int) -> float:
    """Twice the sgemm error bound D * 2^-24 for D-dim unit vectors (assignment compares two
    approximate scores), and never below 1.5e-4."""
    return max(MARGINS["fp32"], 2.5 * d * 2.0**-24)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x: (B, D) raw descriptors -> (B, D) float32 canonical unit vectors.

    Normalised in float64, one row at a time in effect (nothing depends on the other rows), so every
    worker gets bit-identical vectors for the same input row. Rows must have a finite, nonzero norm.
    """
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=1))
    return (x64 / norms[:, None]).astype(np.float32)


def row_norms(x: np.ndarray, block_rows: int = 4096, threads: int | None = None) -> np.ndarray:
    """x: (N, D) any float dtype, may be a memmap -> (N,) float64 L2 norms (NaN/inf for bad rows).

    Row blocks on a thread pool (numpy releases the GIL): each norm is a per-row float64 sum, so the
    result does not depend on the block size or the thread count. Memory: two float64 blocks per
    thread (4096 x 512: 32 MiB each)."""
    out = np.empty(len(x), dtype=np.float64)

    def work(s: int) -> None:
        b = np.asarray(x[s : s + block_rows], dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            out[s : s + len(b)] = np.sqrt((b * b).sum(axis=1))

    for _ in pool_map(work, range(0, len(x), block_rows), threads):
        pass
    return out


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
    """The one threshold test everywhere: strict `>`, in float32."""
    return np.asarray(cos, dtype=np.float32) > np.float32(threshold)


def unique_pairs(pairs: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pairs: (P, 2) int64, cos: (P,) -> the same set with i < j, sorted by (i, j), each pair once
    (multi-assignment finds a pair in every cluster the two items share; its cosine is identical)."""
    pairs = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs, cos = pairs[order], np.asarray(cos, dtype=np.float32)[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    return pairs[first], cos[first]


def pool_map(fn, items, threads: int | None):
    """Ordered map over a thread pool (numpy's BLAS releases the GIL). threads=1: plain loop."""
    threads = threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # one BLAS thread per block: the pool is the parallelism (a multi-threaded BLAS on small calls
    # is many times slower here)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        yield from pool.map(fn, items)
