"""SSCD near-duplicate removal in one process: `find_duplicates(embeddings, keys, cfg) -> DedupResult`.

SD3 App. E.2, made measurable (docs/architecture.md): L2-normalised descriptors; spherical k-means on
a sample chosen by key hash; each item searched in its `assign` nearest clusters; exact search inside
clusters at cosine > threshold (float32, strict); SD3 Algorithm 1 applied once over all found pairs
in priority order (`flowcurate.dedup.keep`). `exact` searches all pairs (100 % recall). Zero, NaN or
infinite descriptors are rejected as `bad_embedding`.

The pieces the Beam graph runs distributed live in `flowcurate.dedup.kmeans`, `.assign`, `.search`
(sample, centroids, assignment, cluster search) and `flowcurate.dedup.keep` (`resolve_component`);
this module only chains them, so the distributed result equals this one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from flowcurate.dedup.engine import Engine, make_engine
from flowcurate.dedup.keep import keep_greedy, priority_rank
from flowcurate.dedup.numerics import ProgressFn, above, row_norms
from flowcurate.dedup.search import find_pairs
from flowcurate.formats.config import DedupConfig
from flowcurate.formats.manifest import BAD_EMBEDDING

STATUS = ("kept", "duplicate", "rejected")
KEPT, DUPLICATE, REJECTED = 0, 1, 2
# SD3 Fig. 16b sweeps these SSCD thresholds; search once at the lowest, re-run the keep rule per threshold
SD3_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95)


@dataclass(frozen=True, eq=False)
class DedupResult:
    """One row per input item, in input order (N items, P found pairs, a assignments per item)."""

    keys: np.ndarray  # (N,) object: the input keys
    status: np.ndarray  # (N,) int8: KEPT | DUPLICATE | REJECTED (names in STATUS)
    duplicate_of: np.ndarray  # (N,) int64: row of the kept item that removed this one, else -1
    similarity: np.ndarray  # (N,) float32: cosine to duplicate_of (full float32; manifests round), else NaN
    cluster: np.ndarray  # (N,) int32: top-1 k-means cluster (0 in exact mode), -1 for rejected rows
    reason: np.ndarray  # (N,) object: rejection reason for rejected rows, else ""
    pairs: np.ndarray  # (P, 2) int64: every found pair (i < j rows) with cosine > threshold, sorted
    pair_cos: np.ndarray  # (P,) float32: their cosines
    rank: np.ndarray  # (N,) int64: the keep rule's visiting order (0 first)
    assignment: np.ndarray  # (N, a) int32: every cluster each row was searched in (-1: none)
    threshold: float
    stats: dict = field(default_factory=dict)  # sizes, timings (s), recall-relevant counts

    def status_names(self) -> np.ndarray:
        """(N,) object: "kept" | "duplicate" | "rejected"."""
        return np.asarray(STATUS, dtype=object)[self.status]

    def counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in enumerate(STATUS)}

    def rows(self) -> Iterator[dict]:
        """Manifest-shaped rows: key, status, reason, duplicate_of (a key), similarity, cluster."""
        names = self.status_names()
        for i in range(len(self.keys)):
            d = int(self.duplicate_of[i])
            yield {
                "key": self.keys[i],
                "status": names[i],
                "reason": self.reason[i] or None,
                "duplicate_of": self.keys[d] if d >= 0 else None,
                "similarity": float(self.similarity[i]) if d >= 0 else None,
                "cluster": int(self.cluster[i]) if self.cluster[i] >= 0 else None,
            }

    def at_threshold(self, threshold: float) -> DedupResult:
        """The result at a higher threshold, from this search's pairs: equal to searching again at
        `threshold` (the candidate sets do not depend on it), without the search."""
        if np.float32(threshold) < np.float32(self.threshold):
            raise ValueError(f"pairs were searched at {self.threshold}; cannot lower it to {threshold}")
        keep = above(self.pair_cos, threshold)
        return _decide(
            self.keys,
            self.status == REJECTED,
            self.reason,
            self.pairs[keep],
            self.pair_cos[keep],
            self.rank,
            self.cluster,
            self.assignment,
            float(threshold),
            dict(self.stats),
        )

    def removed_counts(self, thresholds: Iterable[float] = SD3_THRESHOLDS) -> dict[float, int]:
        """Near-duplicates removed at each threshold >= self.threshold (SD3 Fig. 16b), one search."""
        return {float(t): int((self.at_threshold(t).status == DUPLICATE).sum()) for t in thresholds}


def check_keys(keys: Sequence[str], n: int) -> np.ndarray:
    """keys: N unique strings -> (N,) object array. The keep rule's order needs unique keys
    (the pipeline renames repeats to `{key}~2` before dedup)."""
    arr = np.empty(len(keys), dtype=object)
    arr[:] = list(keys)
    if len(arr) != n:
        raise ValueError(f"{len(arr)} keys for {n} embeddings")
    if not all(isinstance(k, str) for k in arr.tolist()):
        raise TypeError("keys must be strings")
    if len(set(arr.tolist())) != n:
        seen: set[str] = set()
        dup = next(k for k in arr.tolist() if k in seen or seen.add(k))
        raise ValueError(f"keys must be unique; {dup!r} repeats")
    return arr


def valid_rows(embeddings: np.ndarray) -> np.ndarray:
    """embeddings: (N, D) float16/32/64, may be a memmap -> (N,) bool: finite with a nonzero norm."""
    if embeddings.ndim != 2 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be (N, D), got shape {embeddings.shape}")
    if embeddings.dtype.kind != "f":
        raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
    norms = row_norms(embeddings)
    return np.isfinite(norms) & (norms > 0)


def find_duplicates(
    embeddings: np.ndarray,
    keys: Sequence[str],
    cfg: DedupConfig = DedupConfig(),
    *,
    pixels: np.ndarray | None = None,
    device: str = "cpu",
    engine: Engine | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> DedupResult:
    """Near-duplicate decisions for N items, as `cfg` (the `[dedup]` section) says.

    embeddings: (N, D) SSCD descriptors, float16/32/64, any scale, may be a memmap (read in blocks;
    never copied whole to float32). keys: (N,) unique strings. pixels: (N,) width*height, or None.
    cfg: threshold (pairs need cosine > it), priority ("pixels": more pixels first, then key; or
    "key"), exact (all pairs, no k-means), clusters ("auto": exact up to 20k items, or 4M when the
    search runs on a GPU, else ~4 sqrt(N)), assign / assign_margin (nearest cells searched per item;
    a 2nd.. cell only within the margin of the best; None: always), kmeans_iters / kmeans_sample /
    kmeans / seed (spherical k-means on about kmeans_sample items chosen by key hash), block_rows
    (memory ~ threads * block_rows^2 * 4 bytes); see `flowcurate.dedup.search.find_pairs`.
    device: where candidate products run ("cpu": numpy fp32; "cuda": torch fp16), or `engine`
    (`flowcurate.dedup.engine.Engine`) itself; the pair set is the same for all.
    threads: CPU threads (default: all available). progress(stage, done, total): optional.
    """
    t0 = time.perf_counter()
    embeddings = embeddings if isinstance(embeddings, np.memmap) else np.asarray(embeddings)
    valid = valid_rows(embeddings)
    keys_arr = check_keys(keys, len(embeddings))
    if cfg.priority not in ("pixels", "key"):
        raise ValueError(f"priority must be 'pixels' or 'key', got {cfg.priority!r}")
    if pixels is not None and len(pixels) != len(keys_arr):
        raise ValueError(f"{len(pixels)} pixel counts for {len(keys_arr)} keys")
    rank = priority_rank(keys_arr, pixels if cfg.priority == "pixels" else None)
    pairs, cos, assignment, stats = find_pairs(
        embeddings, keys_arr, cfg, valid, engine=engine or make_engine(device), threads=threads,
        progress=progress,
    )
    reason = np.where(valid, "", BAD_EMBEDDING).astype(object)
    stats.update(exact=bool(cfg.exact), assign=int(assignment.shape[1]), assign_margin=cfg.assign_margin)
    result = _decide(
        keys_arr, ~valid, reason, pairs, cos, rank, assignment[:, 0], assignment, float(cfg.threshold), stats
    )
    result.stats["t_total"] = time.perf_counter() - t0
    return result


def _decide(keys, rejected, reason, pairs, cos, rank, cluster, assignment, threshold, stats) -> DedupResult:
    n = len(keys)
    dup_of, sim = keep_greedy(n, pairs, cos, rank)
    status = np.full(n, KEPT, dtype=np.int8)
    status[dup_of >= 0] = DUPLICATE
    status[rejected] = REJECTED
    stats = {**stats, "n_pairs": int(len(pairs))}
    return DedupResult(
        keys=keys,
        status=status,
        duplicate_of=dup_of,
        similarity=sim,
        cluster=np.where(rejected, -1, cluster).astype(np.int32),
        reason=np.asarray(reason, dtype=object),
        pairs=pairs,
        pair_cos=cos,
        rank=rank,
        assignment=assignment,
        threshold=threshold,
        stats=stats,
    )


__all__ = [
    "DUPLICATE",
    "KEPT",
    "REJECTED",
    "SD3_THRESHOLDS",
    "STATUS",
    "DedupResult",
    "check_keys",
    "find_duplicates",
    "valid_rows",
]
