"""Each item's nearest k-means cells (with a margin), and the cells' member lists.

Deterministic per row: BLAS (or a GPU, `flowcurate.dedup.device.DeviceAssign`) proposes centroids
within a margin of the a-th best, a float64 dot product ranks them, ties go to the lower centroid
id, so any batch of rows on any worker gets the same ids.
"""

from __future__ import annotations

import numpy as np

from flowcurate.dedup.engine import Engine
from flowcurate.dedup.numerics import fp32_margin, pool_map, unit_rows


def rescore(
    u: np.ndarray, centroids: np.ndarray, rows: np.ndarray, cols: np.ndarray, top: int
) -> tuple[np.ndarray, np.ndarray]:
    """Proposed (row, centroid) pairs -> each row's `top` best by a float64 dot product, ties to the
    lower centroid id: ids (B, top) int32 (-1: none), sims (B, top) float32. The result is the same for
    every proposal set that contains each row's true top (any proposer whose error is within the
    margin)."""
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


def _host_block(u: np.ndarray, centroids: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    s = u @ centroids.T  # BLAS: only proposes; rescored exactly
    kth = -np.partition(-s, top - 1, axis=1)[:, top - 1]
    rows, cols = np.nonzero(s >= (kth - fp32_margin(u.shape[1]))[:, None])
    return rescore(u, centroids, rows, cols, top)


# Decision (recall measured at 100k and 1M, BENCHMARKS.md): at equal search work, more assignments
# beat bigger clusters, and the margin (keep a further centroid only within 0.1 of the best) costs no
# recall while saving work where the data has structure.
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
    dropped entries are -1 / NaN; None keeps all. With an `engine` whose `on_device` is true, the
    device proposes (float64 products); the ranking is the same host code, so ids and sims are
    identical.
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    top = max(1, min(int(assign), len(centroids)))
    if engine is not None and engine.on_device:
        from flowcurate.dedup.device import DeviceAssign

        # per block, host memory ~ rows x (top + 1) x D x 32 bytes (512 rows, top 8, 512-d: ~70 MiB)
        block_rows = max(64, min(block_rows, 512))
        propose = DeviceAssign(engine, centroids, top)

        def block(u: np.ndarray):
            return rescore(u, centroids, *propose(u), top)
    else:
        # keep the (rows x k) similarity block near 64 MiB
        block_rows = max(64, min(block_rows, (1 << 24) // max(1, len(centroids))))

        def block(u: np.ndarray):
            return _host_block(u, centroids, top)

    ids = np.empty((len(vectors), top), np.int32)
    sims = np.empty((len(vectors), top), np.float32)

    def work(s: int) -> None:  # fills its rows in place: no second copy of ids / sims
        ids[s : s + block_rows], sims[s : s + block_rows] = block(unit_rows(vectors[s : s + block_rows]))

    for _ in pool_map(work, range(0, len(vectors), block_rows), threads):
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
    0.6 GB), a fraction of what a repeat/filter/argsort/gather chain holds.
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


class Rows:
    """A lazy row subset of a (memory-mapped) array: `Rows(x, rows)[a:b]` reads only those rows,
    so assignment never materialises a copy of a large memmap."""

    def __init__(self, x: np.ndarray, rows: np.ndarray):
        self.x, self.rows = x, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl):
        return self.x[self.rows[sl]]
