"""Planted near-duplicate embeddings: the one synthetic data set of the dedup benchmarks and tests.

    x = np.empty((n, 512), np.float32)            # or an np.lib.format.open_memmap of any float dtype
    truth = generate(x, "clustered", seed=0)      # truth.pairs (P, 2) base/copy rows, truth.target (P,)

Rows are unit vectors written in chunks, each chunk seeded by its position, so an in-memory array
and a memory map hold the same rows whatever the chunk order or thread count.

  clustered  anisotropic noise (per-dimension scale ~ d^-1/4, effective dimension ~285 of 512), a
             shared mean direction, N/100 topics of log-normal sizes and varying tightness: unrelated
             same-topic pairs at cosine ~0.2-0.4, a thin tail above 0.5.
  isotropic  uniform on the sphere: no structure for k-means to use (the hard case).
  Both: a `fraction` of rows (default 6 %) are planted copies of base rows, about 2 copies per chosen
  base (so chains exist), cycling through `bins` (default a third each at cosine U(0.5, 0.7),
  U(0.7, 0.9), U(0.9, 1.0)), displaced along the data's own noise directions.

Pure numpy (no flowcurate.dedup): the tests and benchmarks of dedup import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

PLANT_BINS = ((0.5, 0.7), (0.7, 0.9), (0.9, 1.0))
GENERATORS = ("clustered", "isotropic")


@dataclass(frozen=True)
class Planted:
    """The planted copies: P = round(fraction * N) pairs, base row < copy row (copies are the last P rows)."""

    pairs: np.ndarray  # (P, 2) int64: (base row, copy row)
    target: np.ndarray  # (P,) float64: the cosine each copy was made at (storage rounding moves it ~1e-3)


def unit(x: np.ndarray) -> np.ndarray:
    """(B, D) -> (B, D) float32 unit rows, normalised in float64 (bit-identical to dedup's `unit_rows`)."""
    x64 = np.asarray(x, dtype=np.float64)
    return (x64 / np.sqrt((x64 * x64).sum(axis=1))[:, None]).astype(np.float32)


def generate(
    out: np.ndarray,
    generator: str = "clustered",
    seed: int = 0,
    *,
    fraction: float = 0.06,
    bins: Sequence[tuple[float, float]] = PLANT_BINS,
    chunk: int = 50_000,
    threads: int = 1,
) -> Planted:
    """Fill out (N, D) (any float dtype; array or memmap) with unit rows -> the planted pairs.

    A copy is y = c x + sqrt(1 - c^2) w, x its base row, w a unit noise direction orthogonal to x,
    c drawn from bins[p % len(bins)] for the p-th copy. `threads` spreads the chunks (same rows)."""
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    n, dim = out.shape
    rng = np.random.default_rng([seed, 0])
    scale = np.full(dim, dim**-0.5) if generator == "isotropic" else (np.arange(dim) + 1.0) ** -0.25
    scale /= np.linalg.norm(scale)  # E|noise|^2 = 1

    def noise(r, m):
        return r.standard_normal((m, dim)) * scale

    n_planted = int(round(fraction * n))
    n_base = n - n_planted
    if generator == "clustered":
        n_topics = max(10, n // 100)
        mean = unit(noise(rng, 1))[0].astype(np.float64)
        centres = unit(noise(rng, n_topics)).astype(np.float64)
        tight = np.sqrt(rng.uniform(0.15, 0.35, n_topics))  # topic weight a_t (a_t^2: same-topic cosine)
        p = np.exp(0.8 * rng.standard_normal(n_topics))
        p /= p.sum()

    def base_chunk(s: int) -> None:
        r = np.random.default_rng([seed, 1, s])
        m = min(chunk, n_base - s)
        if generator == "isotropic":
            x = r.standard_normal((m, dim))
        else:
            t = r.choice(n_topics, m, p=p)
            a = tight[t][:, None]
            x = math.sqrt(0.05) * mean + a * centres[t] + np.sqrt(0.95 - a**2) * unit(noise(r, m))
        out[s : s + m] = unit(x)

    pool = rng.choice(n_base, max(1, n_planted // 2), replace=False) if n_base else np.zeros(0, np.int64)
    base = np.sort(rng.choice(pool, n_planted)) if n_planted else np.zeros(0, np.int64)
    target = np.empty(n_planted)
    lo_hi = np.array(bins, dtype=np.float64)

    def copy_chunk(s: int) -> None:
        r = np.random.default_rng([seed, 2, s])
        m = min(chunk, n_planted - s)
        lo, hi = lo_hi[np.arange(s, s + m) % len(lo_hi)].T
        c = r.uniform(lo, hi)
        x = unit(out[base[s : s + m]]).astype(np.float64)
        w = noise(r, m)
        w -= (w * x).sum(axis=1, keepdims=True) * x
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        out[n_base + s : n_base + s + m] = unit(c[:, None] * x + np.sqrt(1 - c**2)[:, None] * w)
        target[s : s + m] = c

    # every base row is written before any copy reads it; chunks within a phase are independent
    for fn, total in ((base_chunk, n_base), (copy_chunk, n_planted)):
        with ThreadPoolExecutor(max(1, threads)) as pool_:
            list(pool_.map(fn, range(0, total, chunk)))
    return Planted(np.stack([base, np.arange(n_base, n)], axis=1).astype(np.int64), target)
