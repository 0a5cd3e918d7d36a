"""Decontamination: inputs whose cosine to any reference (evaluation) item is above the threshold are
rejected as `filtered:reference` and take no part in the dedup."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from flowcurate.dedup.engine import make_engine, search_block_pair
from flowcurate.dedup.numerics import unit_rows
from flowcurate.formats.config import DedupConfig

REFERENCE_REASON = "filtered:reference"


def match_reference(embeddings, rows, reference, ref_rows, ref_keys: Sequence[str], cfg: DedupConfig, *,
                    device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each input row's most similar reference row above cfg.threshold (blocks of cfg.block_rows).

    embeddings: (N, D) raw inputs, rows: input rows to check; reference: (R, D) raw, ref_rows: its
    valid rows; ref_keys: (R,) -> best (N,) int64 reference row (-1: none above), cos (N,) float32.
    Candidates come from matrix products, membership and the winner from the exact float32 cosine
    (`flowcurate.dedup.engine.search_block_pair`); ties go to the smaller reference key, so the answer
    does not depend on block sizes or file order. progress(done, total): input blocks searched.
    """
    threshold, block_rows = cfg.threshold, cfg.block_rows
    n = len(embeddings)
    best = np.full(n, -1, dtype=np.int64)
    best_cos = np.full(n, -np.inf, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    ref_rows = np.asarray(ref_rows, dtype=np.int64)
    if len(rows) == 0 or len(ref_rows) == 0:
        return best, np.where(best >= 0, best_cos, np.nan).astype(np.float32)
    key_rank = np.empty(len(ref_keys), dtype=np.int64)
    key_rank[np.argsort(np.asarray(ref_keys, dtype=object), kind="stable")] = np.arange(len(ref_keys))
    engine = make_engine(device)
    ref_blocks = [ref_rows[s:s + block_rows] for s in range(0, len(ref_rows), block_rows)]
    cached = len(ref_rows) * reference.shape[1] * 4 <= 1 << 29  # keep unit reference rows if <= 512 MiB
    ref_units = [unit_rows(reference[b]) for b in ref_blocks] if cached else None
    starts = range(0, len(rows), block_rows)
    for done, s in enumerate(starts, 1):
        ia_rows = rows[s:s + block_rows]
        ua = unit_rows(embeddings[ia_rows])
        for b, rb in enumerate(ref_blocks):
            ub = ref_units[b] if cached else unit_rows(reference[rb])
            ia, ib, cos = search_block_pair(ua, ub, threshold, engine)
            if len(ia) == 0:
                continue
            gi, gj = ia_rows[ia], rb[ib]
            # merge with the current best: per input row, highest cosine, then smallest reference key
            gi = np.concatenate([gi, gi])
            gj = np.concatenate([gj, np.where(best[ia_rows[ia]] >= 0, best[ia_rows[ia]], gj)])
            cos = np.concatenate([cos, np.where(best[ia_rows[ia]] >= 0, best_cos[ia_rows[ia]], cos)])
            order = np.lexsort((key_rank[gj], -cos, gi))
            gi, gj, cos = gi[order], gj[order], cos[order]
            first = np.ones(len(gi), dtype=bool)
            first[1:] = gi[1:] != gi[:-1]
            best[gi[first]], best_cos[gi[first]] = gj[first], cos[first]
        if progress:
            progress(done, len(starts))
    return best, np.where(best >= 0, best_cos, np.nan).astype(np.float32)
