"""Vectors -> every pair above the threshold that shares a group: exact (one group) or in k-means cells.

The pieces a distributed runner needs, each deterministic per row or per pair:
`in_kmeans_sample` -> `train_centroids` (`flowcurate.dedup.kmeans`) -> `assign_clusters`
(`flowcurate.dedup.assign`) -> `search_cluster` (or, for a cluster too big for one worker,
`block_pairs` + `search_block_pair` in `flowcurate.dedup.engine`). `find_pairs` chains them in one
process; the pair set never depends on threads, block size, engine or input order
(`flowcurate.dedup.numerics`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from flowcurate.dedup.assign import Rows, assign_clusters, group_members
from flowcurate.dedup.engine import FP32, Engine, check, pick
from flowcurate.dedup.kmeans import auto_clusters, kmeans_sample_fraction, sample_rows, train_centroids
from flowcurate.dedup.numerics import BLOCK_ROWS, ProgressFn, pool_map, unique_pairs, unit_rows
from flowcurate.formats.config import DedupConfig

KMEANS = ("auto", "faiss", "torch")


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
    (`flowcurate.dedup.device.device_pairs`); the pair set and cosines are the same.
    """
    engine = engine or FP32
    if engine.on_device:
        from flowcurate.dedup.device import device_pairs

        out = device_pairs(embeddings, groups, threshold, engine, block_rows, threads, progress)
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
        return pick(engine, min(block_rows, len(groups[g])))

    def work(task):
        g, a, nb = task
        eng = group_engine(g)
        ra, pa = block(g, a, eng)
        out, n_cand = [], 0
        for b in range(a, nb):
            rb, pb = (ra, None) if b == a else block(g, b, eng)
            ia, ib, cos, n = check(pa, pb, threshold, eng)
            out.append((ra[ia], rb[ib], cos))
            n_cand += n
        return out, n_cand

    # torch engines use torch's threads: run their tasks here, one at a time; numpy tasks in a pool
    own = [t for t in tasks if group_engine(t[0]).backend == "torch"]
    pooled = [t for t in tasks if group_engine(t[0]).backend == "numpy"]
    parts, n_candidates, done = [], 0, 0
    for results in (map(work, own), pool_map(work, pooled, threads)):
        for out, n_cand in results:
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
    cfg: DedupConfig,
    valid: np.ndarray | None = None,
    *,
    engine: Engine | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The whole search in one process, as `cfg` (the `[dedup]` section) says.

    embeddings: (N, D) raw; keys: (N,); valid: (N,) bool rows to search (default all).
    -> pairs (P, 2) int64 row indices (i < j, sorted), cos (P,) float32, assignment (N, a) int32
    cluster ids (-1: none; invalid rows all -1), stats (timings in seconds, sizes).
    cfg.exact, or one cluster, searches all valid rows against each other: 100 % recall.
    cfg.clusters: "auto" (`auto_clusters`, with the GPU's larger exact range when the engine runs on
    one) or a count. cfg.kmeans: "faiss" (CPU), "torch" (`torch_kmeans` on the engine's torch device,
    or the CPU), or "auto": torch when the engine runs on a GPU, else FAISS.
    """
    n = len(embeddings)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rows = np.flatnonzero(valid)
    threshold = cfg.threshold
    gpu = engine is not None and engine.on_gpu
    if cfg.kmeans not in KMEANS:
        raise ValueError(f"kmeans must be 'auto', 'faiss' or 'torch', got {cfg.kmeans!r}")
    if cfg.kmeans == "torch" or (cfg.kmeans == "auto" and gpu):
        kmeans_device = engine.device if engine is not None and engine.backend == "torch" else "cpu"
    else:
        kmeans_device = None
    k = auto_clusters(len(rows), device=gpu) if cfg.clusters == "auto" else max(1, int(cfg.clusters))
    if cfg.exact:
        k = 1
    stats: dict = {"n_valid": int(len(rows)), "threshold": float(threshold)}
    t0 = time.perf_counter()
    if k == 1:
        assignment = np.full((n, 1), -1, dtype=np.int32)
        assignment[rows, 0] = 0
        groups = [rows]
        stats.update(n_clusters=1, sample=0)
    else:
        sample = sample_rows(rows, keys, kmeans_sample_fraction(len(rows), k, cfg.kmeans_sample))
        if progress:
            progress("kmeans", 0, 1)
        centroids = train_centroids(
            embeddings[sample],
            [keys[r] for r in sample],
            k,
            iters=cfg.kmeans_iters,
            seed=cfg.seed,
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
            Rows(embeddings, rows), centroids, cfg.assign, assign_margin=cfg.assign_margin,
            threads=threads, engine=engine,
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
        embeddings, groups, threshold, block_rows=cfg.block_rows, engine=engine, threads=threads,
        progress=progress,
    )
    stats.update(s_stats, t_search=time.perf_counter() - t2, n_pairs=int(len(pairs)))
    return pairs, cos, assignment, stats
