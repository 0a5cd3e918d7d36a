"""GPU exact near-duplicate search: the same pair set as FAISS exact search, and its time at scale.

    python benchmarks/dedup_gpu_check.py --check-n 200000 --scale-n 1000000 4000000

1. At --check-n, `find_duplicates(exact=True, device="cuda")` (torch fp16 candidate products, float32
   re-check) against FAISS `IndexFlatIP.range_search` on the CPU: the pair sets must be identical.
2. At each --scale-n, GPU exact mode alone: wall time per phase and pairs found, float16 input.
Embeddings: clustered 512-d unit vectors with planted near-duplicates (cosine 0.5-1.0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, peak_rss_mb  # noqa: E402
from dedup.core import find_duplicates  # noqa: E402


def embeddings(n: int, dim: int = 512, seed: int = 0, centres: int = 1000, dup_fraction: float = 0.05):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float16)
    step = 1 << 18
    for s in range(0, n, step):
        m = min(step, n - s)
        x = c[rng.integers(0, centres, m)] * 0.35 + rng.standard_normal((m, dim)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    k = int(n * dup_fraction)
    src, dst = rng.choice(n, k, replace=False), rng.choice(n, k, replace=False)
    target = rng.uniform(0.5, 1.0, k).astype(np.float32)[:, None]
    noise = rng.standard_normal((k, dim)).astype(np.float32)
    base = out[src].astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    out[dst] = target * base + np.sqrt(1 - target**2) * noise
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-n", type=int, default=200_000)
    ap.add_argument("--scale-n", type=int, nargs="*", default=[1_000_000])
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--block-rows", type=int, default=8192, help="rows per product block (GPU: large)")
    args = ap.parse_args(argv)
    print("machine:", machine(), flush=True)
    out = {}
    if args.check_n:
        import faiss

        t0 = time.perf_counter()
        x = embeddings(args.check_n)
        print(f"generated {x.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
        keys = [f"{i:09d}" for i in range(len(x))]
        t0 = time.perf_counter()
        res = find_duplicates(x, keys, args.threshold, exact=True, device=args.device, block_rows=args.block_rows)
        t_gpu = time.perf_counter() - t0
        print(f"gpu exact at {len(x)}: {t_gpu:.1f} s, {len(res.pairs)} pairs, stats {res.stats}", flush=True)
        ours = {(int(a), int(b)) for a, b in res.pairs}
        xf = x.astype(np.float32)
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(xf.shape[1])
        index.add(xf)
        lims, dist, ids = index.range_search(xf, np.float32(args.threshold))
        t_faiss = time.perf_counter() - t0
        theirs = set()
        for i in range(len(xf)):
            for j in ids[lims[i]:lims[i + 1]]:
                if i < j:
                    theirs.add((i, int(j)))
        out["check"] = {"n": args.check_n, "gpu_exact_s": t_gpu, "faiss_cpu_s": t_faiss, "faiss_pairs": len(theirs),
                        "ours_pairs": len(ours), "identical": ours == theirs, "counts": res.counts(),
                        "speedup": t_faiss / t_gpu, "stats": res.stats}
        print(json.dumps(out["check"]), flush=True)
    for n in args.scale_n:
        x = embeddings(n)
        keys = [f"{i:09d}" for i in range(n)]
        t0 = time.perf_counter()
        res = find_duplicates(x, keys, args.threshold, exact=True, device=args.device, block_rows=args.block_rows)
        dt = time.perf_counter() - t0
        info = {"n": n, "gpu_exact_s": dt, "pairs": len(res.pairs), "counts": res.counts(), "stats": res.stats,
                "peak_rss_mb": peak_rss_mb()}
        out[f"scale_{n}"] = info
        print(json.dumps(info, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
