"""Dedup side by side on planted 512-d embeddings: exact FAISS, the SD3 recipe, SemDeDup's keep rule, ours.

    OPENBLAS_NUM_THREADS=1 python benchmarks/dedup_bench.py --n 100000 --generator clustered --json 100k.json
    python benchmarks/dedup_bench.py --n 10000000 --methods ours --memmap /tmp/emb10m.npy \\
        --dtype float16 --device cuda --clusters 12649       # scale run: data on disk, read in blocks
    python benchmarks/dedup_bench.py --n 50000 --methods faiss,ours-exact --threads 16   # CPU exact

Data: `flowcurate.models.tiny.planted.generate` (clustered or isotropic, 6 % planted copies), seeded.
Methods (all at cosine > --threshold; SD3 and SemDeDup with k = sqrt(N), k-means on ~100k rows):
  faiss      exact: IndexFlatIP.range_search of every row (N <= --exact-full-max) or of a query
             sample (random + planted rows), its time extrapolated x N/queries. Ground truth.
  sd3        SD3 App. E.2: faiss spherical k-means, top-1 assignment, a flat index and range_search
             per cluster, Algorithm 1 per cluster (keep the first-visited, drop its neighbours).
  semdedup   SemDeDup's rule on the same clusters (same pairs): members farthest-from-centroid first
             ("hard"), j removed iff max cos to any earlier member > t, even a removed one.
  ours       flowcurate.dedup.core.find_duplicates, the [dedup] defaults (--clusters overrides k).
  ours-exact the same with exact=True; on the CPU above --exact-full-max timed on a random 1/10
             subset and extrapolated (search x r^2, the rest x r); on a GPU always in full.
Recall: found / exact pairs by cosine bin (at large N of the pairs touching the query rows;
"identical": exactly FAISS's pairs there), and planted-pair recall. Memory: peak RssAnon per method
(not a memmap's pages), sampled every 20 ms; VmHWM for the whole process; GPU peak in `info`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import faiss
import numpy as np
from common import AnonPeak, machine, status_kb  # benchmarks/ is on sys.path as a script

from flowcurate.dedup.core import DUPLICATE, find_duplicates
from flowcurate.dedup.keep import keep_greedy, priority_rank
from flowcurate.dedup.numerics import above, pair_cosines
from flowcurate.formats.config import DedupConfig
from flowcurate.models.tiny.planted import GENERATORS, generate

REPORT_BINS = ((0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0))
METHODS = ("faiss", "sd3", "semdedup", "ours", "ours-exact")
INFO = ("n_clusters", "largest_cluster", "assignments_per_item", "pairwise_work", "candidates", "engine",
        "kmeans", "device")


def encode(pairs: np.ndarray, n: int) -> np.ndarray:
    p = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
    return np.unique(p[:, 0] * n + p[:, 1])


def faiss_exact(u: np.ndarray, t: float, queries: np.ndarray | None, block: int = 10_000) -> dict:
    """Pairs with an end in `queries` (None: all rows) by IndexFlatIP.range_search; canonical cosines."""
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(u.shape[1])
    index.add(u)
    q = np.arange(len(u)) if queries is None else queries
    parts = []
    for s in range(0, len(q), block):
        lims, _, ids = index.range_search(u[q[s : s + block]], t)
        src = np.repeat(q[s : s + block], np.diff(lims).astype(np.int64))
        parts.append(np.stack([src, ids], axis=1)[src != ids])
    t_search = time.perf_counter() - t0
    pairs = np.unique(np.sort(np.concatenate(parts), axis=1), axis=0)
    cos = pair_cosines(u, pairs)
    ok = above(cos, t)  # the canonical test; FAISS's own sgemm cosines differ by ~1e-7
    scale = len(u) / len(q)
    return {"pairs": pairs[ok], "cos": cos[ok], "dropped_at_boundary": int((~ok).sum()),
            "t": {"search": t_search * scale}, "extrapolated": scale if queries is not None else None}


def kmeans_top1(u: np.ndarray, k: int, sample: int, seed: int) -> dict:
    """faiss spherical k-means on a random sample, then each row's nearest centroid."""
    t0 = time.perf_counter()
    rows = np.sort(np.random.default_rng([seed, 3]).choice(len(u), min(len(u), sample), replace=False))
    km = faiss.Kmeans(u.shape[1], k, niter=20, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=len(rows) // k + 1)
    km.train(np.ascontiguousarray(u[rows]))
    t1 = time.perf_counter()
    assign = np.concatenate([km.index.search(u[s : s + 65536], 1)[1][:, 0] for s in range(0, len(u), 65536)])
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(k + 1))
    return {"centroids": km.centroids, "members": [order[bounds[c] : bounds[c + 1]] for c in range(k)],
            "t": {"kmeans": t1 - t0, "assign": time.perf_counter() - t1}}


def sd3_recipe(u: np.ndarray, t: float, clusters: dict) -> dict:
    """Per cluster: IndexFlatIP over its members, range_search of all of them, then Algorithm 1."""
    t0 = time.perf_counter()
    found = []
    for rows in clusters["members"]:
        if len(rows) >= 2:
            index = faiss.IndexFlatIP(u.shape[1])
            index.add(np.ascontiguousarray(u[rows]))
            lims, _, ids = index.range_search(np.ascontiguousarray(u[rows]), t)
            found.append((rows, lims.astype(np.int64), ids))
    t1 = time.perf_counter()
    removed = set()
    for rows, lims, ids in found:  # SD3 App. E.2 Algorithm 1, per cluster
        dups = set()
        for i in range(len(rows)):
            if i not in dups:
                dups.update(j for j in ids[lims[i] : lims[i + 1]].tolist() if j != i)
        removed.update(rows[sorted(dups)].tolist())
    t2 = time.perf_counter()
    pairs = [np.stack([rows[src], rows[ids]], axis=1)[src != ids]  # the pairs it saw, for recall
             for rows, lims, ids in found for src in [np.repeat(np.arange(len(rows)), np.diff(lims))]]
    return {"pairs": np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64), "removed": len(removed),
            "t": {**clusters["t"], "search": t1 - t0, "keep": t2 - t1},
            "info": {"n_clusters": len(clusters["members"]),
                     "largest_cluster": max(len(m) for m in clusters["members"])}}


def semdedup_rule(u: np.ndarray, t: float, clusters: dict, block: int = 4096) -> dict:
    """SemDeDup on the same clusters: order by cosine to the centroid ascending (farthest first, "hard"),
    M[j] = max_{i<j} cos(i, j) over the cluster, remove j iff M[j] > t."""
    t0 = time.perf_counter()
    removed = 0
    for c, rows in enumerate(clusters["members"]):
        if len(rows) < 2:
            continue
        x = np.ascontiguousarray(u[rows], dtype=np.float32)
        x = x[np.argsort(x @ clusters["centroids"][c], kind="stable")]
        for s in range(0, len(x), block):
            sim = x[: s + block] @ x[s : s + block].T  # rows i (all earlier), columns j in this block
            sim[np.arange(len(sim))[:, None] >= np.arange(s, s + sim.shape[1])[None, :]] = -np.inf
            removed += int((sim.max(axis=0) > np.float32(t)).sum())
    return {"removed": removed, "t": {**clusters["t"], "search": time.perf_counter() - t0}}


def ours(x: np.ndarray, keys: list[str], cfg: DedupConfig, args) -> dict:
    if args.device.startswith("cuda"):
        import torch

        warm = dataclasses.replace(cfg, exact=True)
        find_duplicates(x[:4096], keys[:4096], warm, device=args.device)  # CUDA context, cuBLAS
        torch.cuda.reset_peak_memory_stats()
    res = find_duplicates(x, keys, cfg, device=args.device, threads=args.threads)
    s = res.stats
    tm = {"kmeans": s.get("t_kmeans", 0.0), "assign": s.get("t_assign", 0.0), "search": s["t_search"]}
    tm["keep"] = s["t_total"] - sum(tm.values())  # keep rule + validation, ranks, bookkeeping
    info = {k: s.get(k) for k in INFO}
    if args.device.startswith("cuda"):
        info["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return {"pairs": res.pairs, "removed": int((res.status == DUPLICATE).sum()), "t": tm, "info": info}


def ours_exact_sampled(x: np.ndarray, cfg: DedupConfig, args, ratio: int = 10) -> dict:
    """exact on a random 1/ratio subset; search time x ratio^2, the rest x ratio."""
    rows = np.sort(np.random.default_rng([args.seed, 4]).choice(len(x), len(x) // ratio, replace=False))
    r = ours(x[rows], [f"{i:09d}" for i in rows.tolist()], cfg, args)
    t = {k: v * (ratio**2 if k == "search" else ratio) for k, v in r["t"].items()}
    return {"pairs": None, "removed": None, "t": t, "extrapolated": ratio**2}


def recall(found: np.ndarray, truth: np.ndarray, truth_cos: np.ndarray, n: int, queries) -> dict:
    """Fraction of truth pairs (encoded) in found, per cosine bin; found restricted to the query rows."""
    f = np.asarray(found, dtype=np.int64).reshape(-1, 2)
    if queries is not None:
        f = f[np.isin(f[:, 0], queries) | np.isin(f[:, 1], queries)]
    codes = encode(f, n)
    hit = np.isin(truth, codes)
    out = {"identical": bool(np.array_equal(codes, truth))}
    for name, sel in [(f"{lo}-{hi}", (truth_cos > lo) & (truth_cos <= hi)) for lo, hi in REPORT_BINS] + \
                     [(">0.8", truth_cos > 0.8)]:
        out[name] = (float(hit[sel].mean()) if sel.any() else None, int(sel.sum()))
    return out


def fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(results: dict, base_total: float | None) -> str:
    bins = [f"{lo}-{hi}" for lo, hi in REPORT_BINS] + [">0.8"]
    head = ["method", "k-means s", "assign s", "search s", "keep s", "total s", "speed-up vs faiss",
            "peak anon MB", "pairs found"] + [f"recall {b}" for b in bins] + ["planted recall", "removed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        tm, est = r["t"], "~" if r.get("extrapolated") else ""
        total = sum(tm.values())
        row = [name + (" (est.)" if est else "")]
        row += [est + fmt(tm[p]) if p in tm else "–" for p in ("kmeans", "assign", "search", "keep")]
        row += [est + fmt(total), fmt(base_total / total, ".2f") + "x" if base_total else "–",
                fmt(r.get("peak_anon_mb"), ".0f"), fmt(r.get("n_pairs"), "d")]
        row += [fmt((r.get("recall") or {}).get(b, (None,))[0], ".3f") for b in bins]
        lines.append("| " + " | ".join(row + [fmt(r.get("planted_recall"), ".3f"), fmt(r.get("removed"), "d")]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--generator", choices=GENERATORS, default="clustered")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--device", default="cpu", help="ours: cpu | cuda (flowcurate.dedup.engine.make_engine)")
    ap.add_argument("--clusters", default="auto", help="ours: [dedup] clusters (auto or K)")
    ap.add_argument("--threads", type=int, help="FAISS, torch, ours and the generator (default: all cores)")
    ap.add_argument("--memmap", help="write the data to this .npy (in chunks) and run on the memmap")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-full-max", type=int, default=200_000,
                    help="above this N, exact FAISS runs on a query sample and ours-exact (CPU) on a 1/10 subset")
    ap.add_argument("--queries", type=int, default=4000, help="random query rows (+1000 planted rows)")
    ap.add_argument("--json", help="write every number to this file")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if bad := set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(bad)}")
    if args.threads:
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    mem, line = AnonPeak(), machine()
    print(f"machine: {line}")
    t0 = time.perf_counter()
    if args.memmap:
        out = np.lib.format.open_memmap(args.memmap, mode="w+", dtype=args.dtype, shape=(args.n, args.dim))
        planted = generate(out, args.generator, args.seed, threads=args.threads or 1)
        out.flush()
        del out
        x = np.load(args.memmap, mmap_mode="r")
    else:
        x = np.empty((args.n, args.dim), dtype=args.dtype)
        planted = generate(x, args.generator, args.seed, threads=args.threads or 1)
    n, t, t_gen = args.n, args.threshold, time.perf_counter() - t0
    print(f"data: {n} x {args.dim} {args.dtype} {args.generator}{' memmap ' + args.memmap if args.memmap else ''},"
          f" {len(planted.pairs)} planted, generated in {t_gen:.1f} s"
          f" (peak anon {mem.mb():.0f} MB)", flush=True)
    keys = [f"{i:09d}" for i in range(n)]
    cfg = DedupConfig(threshold=t, clusters=args.clusters)
    u = np.ascontiguousarray(x, dtype=np.float32) if {"faiss", "sd3", "semdedup"} & set(methods) else None
    queries = None
    if n > args.exact_full_max:
        rng = np.random.default_rng([args.seed, 5])
        planted_rows = planted.pairs[rng.choice(len(planted.pairs), min(1000, len(planted.pairs)), replace=False), 1]
        queries = np.unique(np.concatenate([rng.choice(n, args.queries, replace=False), planted_rows]))
    p_cos = pair_cosines(x, planted.pairs)  # the stored rows' cosines (float16 storage moves them ~1e-3)
    p_ok = above(p_cos, t)  # planted pairs are (base, copy) with base < copy, each once
    p_code, p_cos = planted.pairs[p_ok, 0] * n + planted.pairs[p_ok, 1], p_cos[p_ok]
    results, truth, clusters = {}, None, None
    k = max(1, int(round(math.sqrt(n))))  # the SD3 recipe's and SemDeDup's k; ours picks its own
    for name in methods:
        mem.reset()
        print(f"running {name} ...", flush=True)
        if name == "faiss":
            r = faiss_exact(u, t, queries)
            truth = (encode(r["pairs"], n), r["cos"])  # pairs come sorted by (i, j), like the codes
            if queries is None:
                dup_of, _ = keep_greedy(n, r["pairs"], r["cos"], priority_rank(np.asarray(keys, dtype=object)))
                r["removed"] = int((dup_of >= 0).sum())
        elif name in ("sd3", "semdedup"):
            clusters = clusters or kmeans_top1(u, k, max(100_000, 40 * k), args.seed)
            r = sd3_recipe(u, t, clusters) if name == "sd3" else semdedup_rule(u, t, clusters)
        elif name == "ours" or queries is None or args.device != "cpu":
            run_cfg = dataclasses.replace(cfg, priority="key", exact=name == "ours-exact")
            r = ours(x, keys, run_cfg, args)
        else:
            r = ours_exact_sampled(x, dataclasses.replace(cfg, priority="key", exact=True), args)
        r["peak_anon_mb"] = mem.mb()
        if r.get("pairs") is not None and not (name == "faiss" and queries is not None):
            r["n_pairs"] = len(encode(r["pairs"], n))
            hit = np.isin(p_code, encode(r["pairs"], n))
            r["planted_recall"] = float(hit.mean())
            r["planted_recall_bins"] = {f"{lo}-{hi}": float(hit[(p_cos > lo) & (p_cos <= hi)].mean())
                                        for lo, hi in REPORT_BINS if ((p_cos > lo) & (p_cos <= hi)).any()}
        results[name] = r
        print(f"  {name}: {json.dumps({kk: round(v, 2) for kk, v in r['t'].items()})}, "
              f"peak anon {r['peak_anon_mb']:.0f} MB, removed {r.get('removed')}", flush=True)
    if "semdedup" in results and "sd3" in results:  # same clusters, same pairs
        results["semdedup"].update({kk: results["sd3"][kk] for kk in ("n_pairs", "planted_recall", "pairs")})
    for r in results.values():
        if truth is not None and r.get("pairs") is not None:
            r["recall"] = recall(r["pairs"], truth[0], truth[1], n, queries)
    base = sum(results["faiss"]["t"].values()) if "faiss" in results else None
    vmhwm = status_kb("VmHWM") / 1024
    print(f"\nN={n}, dim={args.dim}, {args.dtype}, {args.generator}, threshold {t}, k={k}, seed {args.seed}; "
          + (f"exact pairs {len(truth[0])}" + (f" touching {len(queries)} query rows" if queries is not None else "")
             if truth else "no exact search") + f"; process VmHWM {vmhwm:.0f} MB")
    print(table(results, base))
    if truth is not None:
        print("exact pairs per bin: " + ", ".join(
            f"{b} {v[1]}" for b, v in results["faiss"]["recall"].items() if b != "identical"))
    for name, r in results.items():
        if r.get("recall") and name != "faiss":
            print(f"{name}: pair set identical to exact FAISS's{' on the query rows' if queries is not None else ''}:"
                  f" {r['recall']['identical']}")
        if r.get("planted_recall_bins"):
            print(f"planted recall by bin, {name}: " + json.dumps({b: round(v, 4) for b, v in r["planted_recall_bins"].items()}))
        if r.get("info"):
            print(f"{name}: {json.dumps(r['info'], default=str)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": line, "args": vars(args), "k": k, "vmhwm_mb": vmhwm, "generate_s": t_gen,
                       "n_queries": None if queries is None else len(queries),
                       "results": {m: {kk: v for kk, v in r.items() if kk not in {"pairs", "cos"}}
                                   for m, r in results.items()}}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
