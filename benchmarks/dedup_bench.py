"""Dedup side by side on synthetic 512-d embeddings: exact FAISS, the SD3 recipe, SemDeDup's keep rule, ours.

    OPENBLAS_NUM_THREADS=1 python benchmarks/dedup_bench.py --n 100000 --generator clustered
    OPENBLAS_NUM_THREADS=1 python benchmarks/dedup_bench.py --n 1000000 --json dedup_1m.json
    OPENBLAS_NUM_THREADS=1 python benchmarks/dedup_bench.py --n 10000000 --methods ours \\
        --memmap /tmp/emb10m.npy --dtype float16          # scale run: data on disk, read in blocks

Data (seeded, generated in chunks, so an in-memory array and a memmap hold the same rows):
  clustered  anisotropic (per-dimension scale ~ d^-1/4, effective dimension ~285 of 512), a common
             mean direction, N/100 topics of log-normal sizes and varying tightness: unrelated
             same-topic pairs at cosine ~0.2-0.4, a thin tail above 0.5.
  isotropic  uniform on the sphere: no structure for k-means to use (the hard case).
  Both: 6 % of rows are planted near-duplicates of base rows (about 2 copies per chosen base, so
  there are chains), a third each at cosine U(0.5, 0.7), U(0.7, 0.9), U(0.9, 1.0).
Methods (all at cosine > --threshold, k-means on ~100k sampled rows; SD3 and SemDeDup with k = sqrt(N)):
  faiss      exact: IndexFlatIP.range_search of every row (N <= --exact-full-max) or of a query
             sample (random rows + planted rows), its time extrapolated x N/queries. Ground truth.
  sd3        SD3 App. E.2: faiss spherical k-means, top-1 assignment, a flat index per cluster and
             range_search, Algorithm 1 per cluster (keep the first-visited, drop its neighbours).
  semdedup   SemDeDup's rule on the same clusters (its reference code, semdedup.py): members sorted
             farthest-from-centroid first ("hard"), j removed iff max cos to any earlier member > t,
             even if that member was itself removed. Same pairs as sd3, so the same recall.
  ours       flowcurate.dedup.core.find_duplicates, default config (assign 3, margin 0.1); --device passes through.
  ours-exact find_duplicates(exact=True); above --exact-full-max timed on a random 1/10 subset and
             extrapolated (search x r^2, the rest x r).
Recall: found pairs / exact pairs by exact cosine bin (at large N only pairs with an end in the query
sample), and planted-pair recall (needs no exact search, so it is measured at every N).
Memory: peak RssAnon (anonymous resident memory, sampled every 20 ms from /proc/self/status by a
thread) per method, so the pages of a memory-mapped input do not count; VmHWM (all resident pages,
file-backed included) is printed for the whole process.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import faiss
import numpy as np
from common import PLANT_BINS, AnonPeak, machine, status_kb  # benchmarks/ is on sys.path as a script

from flowcurate.dedup.core import DUPLICATE, find_duplicates
from flowcurate.dedup.keep import keep_greedy, priority_rank
from flowcurate.dedup.search import above, pair_cosines, unit_rows

REPORT_BINS = ((0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0))
PLANTED = 0.06
METHODS = ("faiss", "sd3", "semdedup", "ours", "ours-exact")


# ----------------------------------------------------------------------------- data


def generate(out: np.ndarray, generator: str, seed: int, chunk: int = 50_000) -> dict:
    """Fill out (N, D) float16/32 (array or memmap) with unit rows; -> planted pairs and their targets."""
    n, dim = out.shape
    rng = np.random.default_rng([seed, 0])
    scale = np.full(dim, dim**-0.5) if generator == "isotropic" else (np.arange(dim) + 1.0) ** -0.25
    scale /= np.linalg.norm(scale)  # E|noise|^2 = 1

    def noise(r, m):
        return r.standard_normal((m, dim)) * scale

    n_planted = int(round(PLANTED * n))
    n_base = n - n_planted
    if generator == "clustered":
        n_topics = max(10, n // 100)
        mean = unit_rows(noise(rng, 1))[0].astype(np.float64)
        centres = unit_rows(noise(rng, n_topics)).astype(np.float64)
        tight = np.sqrt(rng.uniform(0.15, 0.35, n_topics))  # topic weight a_t (a_t^2: same-topic cos)
        p = np.exp(0.8 * rng.standard_normal(n_topics))
        p /= p.sum()
    for s in range(0, n_base, chunk):
        r = np.random.default_rng([seed, 1, s])
        m = min(chunk, n_base - s)
        if generator == "isotropic":
            x = r.standard_normal((m, dim))
        else:
            t = r.choice(n_topics, m, p=p)
            a = tight[t][:, None]
            x = math.sqrt(0.05) * mean + a * centres[t] + np.sqrt(0.95 - a**2) * unit_rows(noise(r, m))
        out[s : s + m] = unit_rows(x)
    # planted copies: y = c x + sqrt(1 - c^2) w, w a unit noise direction orthogonal to x
    pool = rng.choice(n_base, max(1, n_planted // 2), replace=False)
    base = np.sort(rng.choice(pool, n_planted))
    target = np.empty(n_planted)
    for s in range(0, n_planted, chunk):
        r = np.random.default_rng([seed, 2, s])
        m = min(chunk, n_planted - s)
        b = np.arange(s, s + m) % 3
        lo, hi = np.array(PLANT_BINS)[b].T
        c = r.uniform(lo, hi)
        x = unit_rows(out[base[s : s + m]]).astype(np.float64)
        w = noise(r, m)
        w -= (w * x).sum(axis=1, keepdims=True) * x
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        out[n_base + s : n_base + s + m] = unit_rows(c[:, None] * x + np.sqrt(1 - c**2)[:, None] * w)
        target[s : s + m] = c
    pairs = np.stack([base, np.arange(n_base, n)], axis=1)
    return {"pairs": pairs, "cos": pair_cosines(out, pairs), "target": target}


# ----------------------------------------------------------------------------- methods


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
        keep = src != ids
        parts.append(np.stack([src[keep], ids[keep]], axis=1))
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
    members = [order[bounds[c] : bounds[c + 1]] for c in range(k)]
    return {"centroids": km.centroids, "members": members,
            "t": {"kmeans": t1 - t0, "assign": time.perf_counter() - t1}}


def sd3_recipe(u: np.ndarray, t: float, clusters: dict) -> dict:
    """Per cluster: IndexFlatIP over its members, range_search of all of them, then Algorithm 1."""
    t0 = time.perf_counter()
    found = []
    for rows in clusters["members"]:
        if len(rows) < 2:
            continue
        index = faiss.IndexFlatIP(u.shape[1])
        index.add(np.ascontiguousarray(u[rows]))
        lims, _, ids = index.range_search(np.ascontiguousarray(u[rows]), t)
        found.append((rows, lims.astype(np.int64), ids))
    t1 = time.perf_counter()
    removed, pairs = set(), []
    for rows, lims, ids in found:  # SD3 Algorithm 1 (App. E.2), per cluster
        dups = set()
        for i in range(len(rows)):
            if i in dups:
                continue
            dups.update(j for j in ids[lims[i] : lims[i + 1]].tolist() if j != i)
        removed.update(rows[sorted(dups)].tolist())
    t2 = time.perf_counter()
    for rows, lims, ids in found:  # the pairs it saw, for recall (not timed)
        src = np.repeat(np.arange(len(rows)), np.diff(lims))
        pairs.append(np.stack([rows[src], rows[ids]], axis=1)[src != ids])
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    return {"pairs": pairs, "removed": len(removed), "t": {**clusters["t"], "search": t1 - t0, "keep": t2 - t1},
            "info": {"n_clusters": len(clusters["members"]),
                     "largest_cluster": max(len(m) for m in clusters["members"])}}


def semdedup_rule(u: np.ndarray, t: float, clusters: dict, block: int = 4096) -> dict:
    """SemDeDup on the same clusters: order by cosine to the centroid ascending (farthest first, "hard"),
    M[j] = max_{i<j} cos(i, j) over the cluster, remove j iff M[j] > t (semdedup.py, `M > 1 - eps`)."""
    t0 = time.perf_counter()
    maxes = []
    for c, rows in enumerate(clusters["members"]):
        if len(rows) < 2:
            continue
        x = np.ascontiguousarray(u[rows], dtype=np.float32)
        x = x[np.argsort(x @ clusters["centroids"][c], kind="stable")]
        m = np.full(len(x), -np.inf, dtype=np.float32)
        for s in range(0, len(x), block):
            sim = x[: s + block] @ x[s : s + block].T  # rows i (all earlier), columns j in this block
            sim[np.arange(len(sim))[:, None] >= np.arange(s, s + sim.shape[1])[None, :]] = -np.inf
            m[s : s + block] = sim.max(axis=0)
        maxes.append(m)
    t1 = time.perf_counter()
    removed = int(sum(int((m > np.float32(t)).sum()) for m in maxes))
    return {"removed": removed, "t": {**clusters["t"], "search": t1 - t0, "keep": time.perf_counter() - t1}}


def ours(x: np.ndarray, keys: list[str], t: float, device: str, exact: bool) -> dict:
    res = find_duplicates(x, keys, t, priority="key", exact=exact, device=device)
    s = res.stats
    tm = {"kmeans": s.get("t_kmeans", 0.0), "assign": s.get("t_assign", 0.0), "search": s["t_search"]}
    tm["keep"] = s["t_total"] - sum(tm.values())  # keep rule + validation, ranks, bookkeeping
    return {"pairs": res.pairs, "removed": int((res.status == DUPLICATE).sum()), "t": tm,
            "info": {k: s.get(k) for k in ("n_clusters", "largest_cluster", "assignments_per_item",
                                           "pairwise_work", "candidates", "engine")}}


def ours_exact_sampled(x: np.ndarray, t: float, device: str, ratio: int, seed: int) -> dict:
    """exact=True on a random 1/ratio subset; search time x ratio^2, the rest x ratio."""
    rows = np.sort(np.random.default_rng([seed, 4]).choice(len(x), len(x) // ratio, replace=False))
    r = ours(x[rows], [f"{i:09d}" for i in rows.tolist()], t, device, exact=True)
    r["t"] = {k: v * (ratio**2 if k == "search" else ratio) for k, v in r["t"].items()}
    return {"pairs": None, "removed": None, "t": r["t"], "extrapolated": ratio**2}


# ----------------------------------------------------------------------------- scoring


def recall(found: np.ndarray | None, truth: np.ndarray, truth_cos: np.ndarray, n: int,
           queries: np.ndarray | None, bins=REPORT_BINS) -> dict:
    """Fraction of truth pairs (encoded) in found, per cosine bin; found restricted to the query rows."""
    if found is None:
        return {}
    f = np.asarray(found, dtype=np.int64).reshape(-1, 2)
    if queries is not None:
        f = f[np.isin(f[:, 0], queries) | np.isin(f[:, 1], queries)]
    hit = np.isin(truth, encode(f, n))
    out = {}
    for lo, hi in bins:
        sel = (truth_cos > lo) & (truth_cos <= hi)
        out[f"{lo}-{hi}"] = (float(hit[sel].mean()) if sel.any() else None, int(sel.sum()))
    sel = truth_cos > 0.8
    out[">0.8"] = (float(hit[sel].mean()) if sel.any() else None, int(sel.sum()))
    return out


def fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(results: dict, base_total: float | None) -> str:
    bins = [f"{lo}-{hi}" for lo, hi in REPORT_BINS] + [">0.8"]
    head = ["method", "k-means s", "assign s", "search s", "keep s", "total s", "speed-up vs faiss",
            "peak anon MB", "pairs found"] + [f"recall {b}" for b in bins] + ["planted recall", "removed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        tm = r["t"]
        total = sum(tm.values())
        est = "~" if r.get("extrapolated") else ""
        row = [name + (" (est.)" if est else "")] + [
            est + fmt(tm.get(p)) if p in tm else "–" for p in ("kmeans", "assign", "search", "keep")]
        row += [est + fmt(total), fmt(base_total / total, ".2f") + "x" if base_total else "–",
                fmt(r.get("peak_anon_mb"), ".0f"), fmt(r.get("n_pairs", None if r.get("pairs") is None else len(r["pairs"])), "d")]
        row += [fmt((r.get("recall") or {}).get(b, (None,))[0], ".3f") for b in bins]
        row += [fmt(r.get("planted_recall"), ".3f"), fmt(r.get("removed"), "d")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--generator", choices=("clustered", "isotropic"), default="clustered")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--device", default="cpu", help="ours only: cpu | cuda (flowcurate.dedup.search.make_engine)")
    ap.add_argument("--memmap", help="write the data to this .npy (in chunks) and run on the memmap")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-full-max", type=int, default=200_000,
                    help="above this N, exact FAISS runs on a query sample and ours-exact on a 1/10 subset")
    ap.add_argument("--queries", type=int, default=4000, help="random query rows (+1000 planted rows)")
    ap.add_argument("--json", help="write every number to this file")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if bad := set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(bad)}")
    mem = AnonPeak()
    line = machine()
    print(f"machine: {line}")
    t0 = time.perf_counter()
    if args.memmap:
        out = np.lib.format.open_memmap(args.memmap, mode="w+", dtype=args.dtype, shape=(args.n, args.dim))
        planted = generate(out, args.generator, args.seed)
        out.flush()
        del out
        x = np.load(args.memmap, mmap_mode="r")
    else:
        x = np.empty((args.n, args.dim), dtype=args.dtype)
        planted = generate(x, args.generator, args.seed)
    n, t = args.n, args.threshold
    print(f"data: {n} x {args.dim} {args.dtype} {args.generator}{' memmap ' + args.memmap if args.memmap else ''},"
          f" {len(planted['pairs'])} planted, generated in {time.perf_counter() - t0:.1f} s"
          f" (peak anon {mem.mb():.0f} MB)", flush=True)
    keys = [f"{i:09d}" for i in range(n)]
    baselines = {"faiss", "sd3", "semdedup"} & set(methods)
    u = np.ascontiguousarray(x, dtype=np.float32) if baselines else None  # rows are unit already
    queries = None
    if n > args.exact_full_max:
        rng = np.random.default_rng([args.seed, 5])
        n_pl = len(planted["pairs"])
        planted_rows = planted["pairs"][rng.choice(n_pl, min(1000, n_pl), replace=False), 1]
        queries = np.unique(np.concatenate([rng.choice(n, args.queries, replace=False), planted_rows]))
    p_ok = above(planted["cos"], t)  # planted pairs are (base, copy) with base < copy, each once
    codes = planted["pairs"][p_ok, 0] * n + planted["pairs"][p_ok, 1]
    order = np.argsort(codes)
    p_code, p_cos = codes[order], planted["cos"][p_ok][order]
    results, truth = {}, None
    clusters = None
    # the SD3 recipe and SemDeDup get k = sqrt(N) (SD3 used 16,000 clusters
    # for its far larger set); ours picks its own k (flowcurate.dedup.search.auto_clusters: 4 sqrt(N))
    k = max(1, int(round(math.sqrt(n))))
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
            if clusters is None:
                clusters = kmeans_top1(u, k, max(100_000, 40 * k), args.seed)
            r = sd3_recipe(u, t, clusters) if name == "sd3" else semdedup_rule(u, t, clusters)
        elif name == "ours":
            r = ours(x, keys, t, args.device, exact=False)
        elif queries is None:
            r = ours(x, keys, t, args.device, exact=True)
        else:
            r = ours_exact_sampled(x, t, args.device, 10, args.seed)
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
        results["semdedup"].update({kk: results["sd3"][kk] for kk in ("n_pairs", "planted_recall")})
        results["semdedup"]["pairs"] = results["sd3"]["pairs"]
    if truth is not None:
        for r in results.values():
            if r.get("pairs") is not None:
                r["recall"] = recall(r["pairs"], truth[0], truth[1], n, queries)
    base = sum(results["faiss"]["t"].values()) if "faiss" in results else None
    vmhwm = status_kb("VmHWM") / 1024
    print(f"\nN={n}, dim={args.dim}, {args.dtype}, {args.generator}, threshold {t}, k={k}, seed {args.seed}; "
          + (f"exact pairs {len(truth[0])}" + (f" touching {len(queries)} query rows" if queries is not None else "")
             if truth else "no exact search") + f"; process VmHWM {vmhwm:.0f} MB")
    print(table(results, base))
    if truth is not None:
        print("exact pairs per bin: " + ", ".join(f"{b} {c}" for b, (_, c) in results["faiss"]["recall"].items()))
    for name, r in results.items():
        if r.get("planted_recall_bins"):
            print(f"planted recall by bin, {name}: " + json.dumps({b: round(v, 4) for b, v in r["planted_recall_bins"].items()}))
        if r.get("info"):
            print(f"{name}: {json.dumps(r['info'])}")
    if args.json:
        drop = {"pairs", "cos"}
        with open(args.json, "w") as fh:
            json.dump({"machine": line, "args": vars(args), "k": k, "vmhwm_mb": vmhwm,
                       "n_queries": None if queries is None else len(queries),
                       "results": {m: {kk: v for kk, v in r.items() if kk not in drop} for m, r in results.items()}},
                      fh, indent=1, default=str)


if __name__ == "__main__":
    main()
