"""dedup on a GPU: identical results to the CPU paths, exact mode at 1M, the default clustered
mode on a float16 memory map up to 10M, with peak anonymous memory. Every result is one JSON line,
appended (and flushed) to --out as soon as it exists, so a timeout loses only the phase it cut.

    python benchmarks/dedup_gpu_check.py run --budget-s 470 --out $OUT/results.jsonl   # all, time-guarded
    python benchmarks/dedup_gpu_check.py check --n 50000 --cluster-n 100000
    python benchmarks/dedup_gpu_check.py exact --n 1000000 --faiss-s 20
    python benchmarks/dedup_gpu_check.py gen --n 10000000 --path /tmp/ddc/emb.npy
    python benchmarks/dedup_gpu_check.py cluster --path /tmp/ddc/emb.npy

check   at --n: find_duplicates(exact=True, device) against FAISS IndexFlatIP.range_search of every row
        (16 CPU threads): the pair sets must be identical. At --cluster-n: the default clustered mode
        (k = 4 sqrt(N), top-8, margin 0.1) on the device and on the CPU (numpy): assignments, pairs,
        cosines and decisions must be identical.
cpu-exact exact mode on the host CPU with each CPU engine (numpy fp32, torch bf16, torch int8) against
        FAISS range_search, on --threads threads: for CPUs with AMX / AVX512-VNNI (the 2-core dev box has neither).
exact   exact mode on the device at --n (float16, in memory), time per phase; FAISS range_search of a
        query sample of the same rows against all of them, for as long as --faiss-s allows: its time x
        N / queries is an extrapolation (labelled), and its pairs must equal ours on those rows.
gen     the clustered data below, float16, written in chunks into an .npy with open_memmap (threads;
        each chunk seeded by its position, so the data does not depend on the thread count).
cluster find_duplicates on np.load(mmap_mode="r") of that file, clustered mode (k = 4 sqrt(N) at every
        size; k-means "auto": torch on the GPU, FAISS on the CPU): time per phase,
        planted-pair recall, and peak anonymous memory = peak RssAnon of the process (heap, arrays,
        torch and CUDA host memory; not the file-backed pages of the memory map), read from
        /proc/self/status every 20 ms by a thread (benchmarks/common.py AnonPeak, as for the 1M CPU
        run in BENCHMARKS.md); VmHWM (which counts the mapped file's resident pages) beside it.
run     all of the above in child processes, each with a timeout from what is left of --budget-s; the
        size of the memmap run is the largest of --scale-n whose time, extrapolated from the 1M run,
        fits what is left (printed with the estimate).

Data: "check --n" and the first GPU version's numbers use `embeddings` (1000 Gaussian centres, 5 % planted
copies at cosine U(0.5, 1)). Everything else uses `clustered`: dedup_bench.py's clustered recipe
(anisotropic noise, a shared mean direction, N/100 topics of log-normal size and varying tightness; 6 %
planted copies, a third each at cosine U(0.5, 0.7), U(0.7, 0.9), U(0.9, 1.0)) in float32 and chunked
over threads, so 10M rows take seconds; not bit-identical to dedup_bench.py's generator.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from benchmarks.common import PLANT_BINS, AnonPeak, machine, status_kb  # noqa: E402
from flowcurate.dedup.core import DUPLICATE, find_duplicates  # noqa: E402
from flowcurate.dedup.search import auto_clusters, pair_cosines, unit_rows  # noqa: E402

OUT_FILE = None


def emit(record: dict) -> None:
    """One JSON line to stdout and to --out (appended, flushed, fsynced: survives a kill)."""
    line = json.dumps(record, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    print(line, flush=True)
    if OUT_FILE:
        with open(OUT_FILE, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def run_dedup(x, keys, threshold, device: str, **kw):
    """find_duplicates on --device; "cpu-resident" (dry runs without a GPU) takes the device-resident
    path with torch float32 on the CPU."""
    if device != "cpu-resident":
        return find_duplicates(x, keys, threshold, device=device, **kw)
    import flowcurate.dedup.core
    from flowcurate.dedup.search import Engine

    make = flowcurate.dedup.core.make_engine
    flowcurate.dedup.core.make_engine = lambda *a, **k: Engine("torch", "cpu", "fp32", resident=True)
    try:
        return find_duplicates(x, keys, threshold, **kw)
    finally:
        flowcurate.dedup.core.make_engine = make


def cuda_sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- data


def embeddings(n: int, dim: int = 512, seed: int = 0, centres: int = 1000, dup_fraction: float = 0.05):
    """The first GPU version's data (BENCHMARKS.md "GPU exact mode, first version"): float16 unit rows."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float16)
    step = 1 << 18
    for s in range(0, n, step):
        m = min(step, n - s)
        x = c[rng.integers(0, centres, m)] * 0.35 + rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    k = int(n * dup_fraction)
    src, dst = rng.choice(n, k, replace=False), rng.choice(n, k, replace=False)
    target = rng.uniform(0.5, 1.0, k).astype(np.float32)[:, None]
    noise = rng.standard_normal((k, dim)).astype(np.float32)
    base = out[src].astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    out[dst] = target * base + np.sqrt(1 - target**2) * noise
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(out: np.ndarray, seed: int = 0, chunk: int = 65536, threads: int | None = None) -> dict:
    """Fill out (N, D) (array or memmap, any float dtype) with the clustered data; -> planted pairs
    (base, copy) and their target cosines."""
    n, dim = out.shape
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng([seed, 0])
    scale = ((np.arange(dim) + 1.0) ** -0.25).astype(np.float32)
    scale /= np.linalg.norm(scale)
    n_planted = int(round(0.06 * n))
    n_base = n - n_planted
    n_topics = max(10, n // 100)
    mean = _unit(rng.standard_normal((1, dim)).astype(np.float32) * scale)[0]
    centres = _unit(rng.standard_normal((n_topics, dim)).astype(np.float32) * scale)
    tight = np.sqrt(rng.uniform(0.15, 0.35, n_topics)).astype(np.float32)
    p = np.exp(0.8 * rng.standard_normal(n_topics))
    cdf = np.cumsum(p) / p.sum()

    def base_chunk(s: int) -> None:
        r = np.random.default_rng([seed, 1, s])
        m = min(chunk, n_base - s)
        t = np.minimum(np.searchsorted(cdf, r.random(m)), n_topics - 1)
        a = tight[t][:, None]
        z = _unit(r.standard_normal((m, dim), dtype=np.float32) * scale)
        out[s : s + m] = _unit(
            np.float32(math.sqrt(0.05)) * mean + a * centres[t] + np.sqrt(0.95 - a * a) * z
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(base_chunk, range(0, n_base, chunk)))
    pool_rows = rng.choice(n_base, max(1, n_planted // 2), replace=False)
    base = np.sort(rng.choice(pool_rows, n_planted))
    target = np.empty(n_planted, np.float32)

    def copy_chunk(s: int) -> None:
        r = np.random.default_rng([seed, 2, s])
        m = min(chunk, n_planted - s)
        lo, hi = np.array(PLANT_BINS, np.float32)[np.arange(s, s + m) % 3].T
        c = r.uniform(lo, hi).astype(np.float32)[:, None]
        x = _unit(np.asarray(out[base[s : s + m]], dtype=np.float32))
        w = r.standard_normal((m, dim), dtype=np.float32) * scale
        w = _unit(w - (w * x).sum(axis=1, keepdims=True) * x)
        out[n_base + s : n_base + s + m] = _unit(c * x + np.sqrt(1 - c * c) * w)
        target[s : s + m] = c[:, 0]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy_chunk, range(0, n_planted, chunk)))
    return {"pairs": np.stack([base, np.arange(n_base, n)], axis=1), "target": target}


def planted_recall(found: np.ndarray, planted: dict, n: int, threshold: float) -> dict:
    """Found share of the planted (base, copy) pairs, by target cosine (those within 0.005 of the
    threshold left out: float16 storage moves a cosine by ~1e-3)."""
    codes = np.unique(found[:, 0].astype(np.int64) * n + found[:, 1])
    p, c = planted["pairs"], planted["target"]
    hit = np.isin(p[:, 0].astype(np.int64) * n + p[:, 1], codes)
    out = {}
    for lo, hi in ((0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0)):
        sel = (c > max(lo, threshold + 0.005)) & (c <= hi)
        out[f"{lo}-{hi}"] = round(float(hit[sel].mean()), 4) if sel.any() else None
    sel = c > max(0.8, threshold + 0.005)
    out[">0.8"] = round(float(hit[sel].mean()), 4) if sel.any() else None
    sel = c > threshold + 0.005
    out["all"] = round(float(hit[sel].mean()), 4) if sel.any() else None
    return out


def faiss_pairs(index, xq: np.ndarray, rows: np.ndarray, threshold: float) -> set:
    """(i, j), i < j, every FAISS range_search hit of the query rows (FAISS's own float32 scores)."""
    lims, _, ids = index.range_search(xq, np.float32(threshold))
    src = np.repeat(rows, np.diff(lims).astype(np.int64))
    keep = src != ids
    a, b = src[keep], ids[keep].astype(np.int64)
    return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))


def faiss_all_pairs(xf: np.ndarray, threshold: float) -> tuple[set, float]:
    """FAISS exact search of every row against all (IndexFlatIP + range_search) -> pairs, seconds."""
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(xf.shape[1])
    index.add(xf)
    pairs = faiss_pairs(index, xf, np.arange(len(xf)), threshold)
    return pairs, time.perf_counter() - t0


def canonical(x: np.ndarray) -> np.ndarray:
    """FAISS's input: the canonical float32 unit rows (`unit_rows`, in blocks). Raw float16 rows are
    off unit length by ~1e-4, which moves FAISS's inner products by as much; FAISS then differs from
    the canonical cosine only by its sgemm rounding (~1e-7)."""
    out = np.empty(x.shape, np.float32)

    def block(s: int) -> None:
        out[s : s + 16384] = unit_rows(x[s : s + 16384])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(block, range(0, len(x), 16384)))
    return out


def differing(x: np.ndarray, xf: np.ndarray, pairs: set, show: int = 10) -> list:
    """Up to `show` pairs found by one side only: canonical cosine and FAISS's float32 score."""
    p = np.array(sorted(pairs)[:show], dtype=np.int64).reshape(-1, 2)
    cos = pair_cosines(x, p)
    return [[int(i), int(j), float(c), float(xf[i] @ xf[j])] for (i, j), c in zip(p.tolist(), cos)]


def timings(res, t_total: float) -> dict:
    s = res.stats
    tm = {
        "kmeans": s.get("t_kmeans", 0.0),
        "assign": s.get("t_assign", 0.0),
        "search": s.get("t_search", 0.0),
    }
    tm["other"] = t_total - sum(tm.values())  # validation, keys, ranks, keep rule, bookkeeping
    tm["total"] = t_total
    return {k: round(v, 3) for k, v in tm.items()}


# ----------------------------------------------------------------------------- phases


def cmd_env(args) -> None:
    import faiss
    import torch

    info = {
        "phase": "env",
        "machine": machine(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(0), gpu_free_gb=free / 2**30, gpu_total_gb=total / 2**30)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    info["scratch"] = str(scratch)
    info["scratch_free_gb"] = shutil.disk_usage(scratch).free / 2**30
    info["mem_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    emit(info)


def cmd_check(args) -> None:

    t = args.threshold
    if args.n:
        x = embeddings(args.n)
        keys = [f"{i:09d}" for i in range(len(x))]
        run_dedup(x[:4096], keys[:4096], t, args.device, exact=True)  # warm-up: CUDA, cuBLAS
        t0 = time.perf_counter()
        res = run_dedup(x, keys, t, args.device, exact=True, block_rows=args.block_rows)
        t_dev = time.perf_counter() - t0
        ours = set(map(tuple, res.pairs.tolist()))
        xf = canonical(x)
        theirs, t_faiss = faiss_all_pairs(xf, t)
        emit(
            {
                "phase": "check-exact",
                "n": args.n,
                "device": args.device,
                "ours_s": round(t_dev, 3),
                "ours_search_s": round(res.stats["t_search"], 3),
                "faiss_cpu_s": round(t_faiss, 3),
                "speedup": round(t_faiss / t_dev, 2),
                "ours_pairs": len(ours),
                "faiss_pairs": len(theirs),
                "identical": ours == theirs,
                "only_ours": len(ours - theirs),
                "only_faiss": len(theirs - ours),
                "differing": differing(x, xf, ours ^ theirs),
                "search_stats": {k: res.stats.get(k) for k in ("candidates", "tasks", "engine", "device")},
            }
        )
    if args.cluster_n:
        x = np.empty((args.cluster_n, 512), np.float16)
        clustered(x, seed=1)
        keys = [f"{i:09d}" for i in range(len(x))]
        out = {"phase": "check-clustered", "n": args.cluster_n}
        results = {}
        for dev in ("cpu", args.device):
            t0 = time.perf_counter()
            # clustered mode (a GPU's "auto" would search 100k exactly) with the same (FAISS) centroids
            results[dev] = run_dedup(x, keys, t, dev, clusters=auto_clusters(len(x)), kmeans="faiss")
            cuda_sync(dev)
            out[f"{dev}_s"] = timings(results[dev], time.perf_counter() - t0)
        a, b = results["cpu"], results[args.device]
        same = {
            f: bool(np.array_equal(getattr(a, f), getattr(b, f)))
            for f in ("assignment", "pairs", "pair_cos", "status", "duplicate_of", "cluster")
        }
        same["similarity"] = bool(np.array_equal(a.similarity, b.similarity, equal_nan=True))
        out.update(
            identical=all(same.values()),
            fields=same,
            pairs=len(a.pairs),
            counts=a.counts(),
            n_clusters=a.stats["n_clusters"],
            assignments_per_item=a.stats.get("assignments_per_item"),
            cpu_engine=a.stats["engine"],
            device_engine=b.stats["engine"],
            candidates={"cpu": a.stats["candidates"], "device": b.stats["candidates"]},
        )
        emit(out)


def cmd_exact(args) -> None:
    import faiss

    t = args.threshold
    t0 = time.perf_counter()
    x = np.empty((args.n, 512), np.float16)
    planted = clustered(x, seed=2)
    keys = [f"{i:09d}" for i in range(len(x))]
    t_gen = time.perf_counter() - t0
    run_dedup(x[:4096], keys[:4096], t, args.device, exact=True)  # warm-up
    t0 = time.perf_counter()
    res = run_dedup(x, keys, t, args.device, exact=True, block_rows=args.block_rows)
    cuda_sync(args.device)
    t_dev = time.perf_counter() - t0
    rec = {
        "phase": "exact",
        "n": args.n,
        "device": args.device,
        "block_rows": args.block_rows,
        "gen_s": round(t_gen, 2),
        "t": timings(res, t_dev),
        "pairs": len(res.pairs),
        "removed": int((res.status == DUPLICATE).sum()),
        "planted_recall": planted_recall(res.pairs, planted, len(x), t),
        "search_stats": {k: res.stats.get(k) for k in ("candidates", "tasks", "engine", "device")},
    }
    if args.device.startswith("cuda"):
        import torch

        rec["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    emit(rec)
    if args.faiss_s <= 0:
        return
    # FAISS exact on the CPU cores: a query sample against all rows, timed and extrapolated x N / queries
    xf = canonical(x)
    index = faiss.IndexFlatIP(xf.shape[1])
    index.add(xf)
    rng = np.random.default_rng(3)
    rand = rng.permutation(len(xf))
    ends = np.unique(res.pairs.reshape(-1))
    ends = ends[rng.permutation(len(ends))]
    inq = np.zeros(len(xf), bool)
    found, t_faiss, half = set(), 0.0, 128
    deadline = time.perf_counter() + args.faiss_s
    for k in range(0, len(xf), half):
        # half random rows, half rows that have a pair, so the comparison is not vacuous
        q = np.unique(np.concatenate([rand[k : k + half], ends[k : k + half]]))
        q = q[~inq[q]]
        if not len(q):
            break
        t0 = time.perf_counter()
        found |= faiss_pairs(index, np.ascontiguousarray(xf[q]), q, t)
        t_faiss += time.perf_counter() - t0
        inq[q] = True
        if time.perf_counter() + t_faiss / inq.sum() * 2 * half > deadline:
            break
    q = np.flatnonzero(inq)
    ours = set(map(tuple, res.pairs[inq[res.pairs[:, 0]] | inq[res.pairs[:, 1]]].tolist()))
    per_query = t_faiss / len(q)
    emit(
        {
            "phase": "exact-faiss",
            "n": args.n,
            "queries": int(len(q)),
            "faiss_threads": faiss.omp_get_max_threads(),
            "faiss_sample_s": round(t_faiss, 2),
            "faiss_full_s_extrapolated": round(per_query * len(xf), 1),
            "ours_s": round(t_dev, 2),
            "speedup_extrapolated": round(per_query * len(xf) / t_dev, 1),
            "pairs_touching_queries": {"ours": len(ours), "faiss": len(found)},
            "identical_on_queries": ours == found,
            "only_ours": len(ours - found),
            "only_faiss": len(found - ours),
            "differing": differing(x, xf, ours ^ found),
        }
    )


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("amx", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx512f")))


def cmd_cpu_exact(args) -> None:
    """Exact mode on the host CPU (not the GPU) against FAISS IndexFlatIP.range_search, both on
    --threads threads, for each CPU engine: numpy fp32, torch bf16 and torch int8 (where fbgemm and
    the CPU allow). Same clustered data, every pair set compared with FAISS's."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    from flowcurate.dedup.search import int8_available

    t = args.threshold
    x = np.empty((args.n, 512), np.float32)
    clustered(x, seed=4)
    keys = [f"{i:09d}" for i in range(len(x))]
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    xf = canonical(x)
    with threadpool_limits(args.threads):
        theirs, t_faiss = faiss_all_pairs(xf, t)
    rec = {
        "phase": "cpu-exact",
        "n": args.n,
        "threads": args.threads,
        "cpu_flags": cpu_flags(),
        "faiss_s": round(t_faiss, 2),
        "faiss_pairs": len(theirs),
        "engines": {},
    }
    engines = [("numpy", "fp32"), ("torch", "bf16")] + ([("torch", "int8")] if int8_available() else [])
    for backend, precision in engines:
        kw = dict(exact=True, backend=backend, device="cpu", precision=precision, threads=args.threads)
        find_duplicates(x[:2048], keys[:2048], t, **kw)  # warm-up (oneDNN kernels)
        t0 = time.perf_counter()
        res = find_duplicates(x, keys, t, **kw)
        dt = time.perf_counter() - t0
        ours = set(map(tuple, res.pairs.tolist()))
        rec["engines"][f"{backend}-{precision}"] = {
            "s": round(dt, 2),
            "speedup_vs_faiss": round(t_faiss / dt, 2),
            "identical": ours == theirs,
            "candidates": res.stats.get("candidates"),
        }
    emit(rec)


def cmd_gen(args) -> None:
    t0 = time.perf_counter()
    Path(args.path).parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(args.path, mode="w+", dtype=np.float16, shape=(args.n, 512))
    planted = clustered(out, seed=args.seed)
    out.flush()
    del out
    np.savez(args.path + ".planted.npz", **planted)
    emit(
        {
            "phase": "gen",
            "n": args.n,
            "path": args.path,
            "gb": round(os.path.getsize(args.path) / 2**30, 2),
            "s": round(time.perf_counter() - t0, 2),
            "planted": len(planted["target"]),
        }
    )


def cmd_cluster(args) -> None:
    mem = AnonPeak()
    x = np.load(args.path, mmap_mode="r")
    planted = dict(np.load(args.path + ".planted.npz"))
    n = len(x)
    if args.device.startswith("cuda"):
        import torch

        torch.zeros(1, device=args.device)  # CUDA context before the baseline
    keys = [f"{i:09d}" for i in range(n)]
    base_mb = status_kb("RssAnon") / 1024
    t0 = time.perf_counter()
    last = {}

    def progress(stage: str, done: int, total: int) -> None:
        # stage boundaries and every ~10 % of the search, so a timeout still says how far it got
        mark = (stage, done * 10 // max(total, 1))
        if done in (0, total) or last.get(stage) != mark:
            last[stage] = mark
            emit(
                {
                    "phase": "cluster-progress",
                    "n": n,
                    "stage": stage,
                    "done": done,
                    "total": total,
                    "s": round(time.perf_counter() - t0, 1),
                    "anon_mb": round(status_kb("RssAnon") / 1024),
                    "peak_anon_mb": round(mem.mb()),
                }
            )

    mem.reset()
    # clustered mode with k = 4 sqrt(N) at every size (on a GPU, "auto" searches up to 4M rows exactly);
    # k-means as "auto" picks it: torch on the GPU, FAISS on the CPU
    res = run_dedup(x, keys, args.threshold, args.device, progress=progress, clusters=auto_clusters(n))
    cuda_sync(args.device)
    dt = time.perf_counter() - t0
    rec = {
        "phase": "cluster",
        "n": n,
        "device": args.device,
        "dtype": str(x.dtype),
        "memmap": args.path,
        "t": timings(res, dt),
        "peak_anon_mb": round(mem.mb()),
        "anon_before_mb": round(base_mb),
        "vmhwm_mb": round(status_kb("VmHWM") / 1024),
        "pairs": len(res.pairs),
        "removed": int((res.status == DUPLICATE).sum()),
        "planted_recall": planted_recall(res.pairs, planted, n, args.threshold),
        "stats": {
            k: res.stats.get(k)
            for k in (
                "n_clusters",
                "sample",
                "kmeans",
                "largest_cluster",
                "assignments_per_item",
                "pairwise_work",
                "candidates",
                "tasks",
                "engine",
                "device",
            )
        },
    }
    if args.device.startswith("cuda"):
        import torch

        rec["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    emit(rec)


# ----------------------------------------------------------------------------- orchestration


def cmd_run(args) -> None:
    start = time.monotonic()

    def left() -> float:
        return args.budget_s - (time.monotonic() - start)

    def child(name: str, argv: list[str], cap: float, need: float) -> int | None:
        """Run a phase in its own process with timeout min(cap, left - reserve); skip it (with a
        note) when less than `need` seconds would be left for it."""
        limit = min(cap, left() - args.reserve_s)
        if limit < need:
            emit({"phase": "skipped", "what": name, "left_s": round(left()), "needed_s": need})
            return None
        t0 = time.monotonic()
        cmd = [sys.executable, __file__, *argv, "--out", OUT_FILE, "--device", args.device]
        try:
            rc = subprocess.run(cmd, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        emit(
            {
                "phase": "done",
                "what": name,
                "rc": rc,
                "s": round(time.monotonic() - t0, 1),
                "limit_s": round(limit),
                "left_s": round(left()),
            }
        )
        return rc

    def records(phase: str, **match) -> list[dict]:
        out = []
        with open(OUT_FILE) as fh:
            for line in fh:
                r = json.loads(line)
                if r.get("phase") == phase and all(r.get(k) == v for k, v in match.items()):
                    out.append(r)
        return out

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    child("env", ["env", "--scratch", str(scratch)], 60, 5)
    if "check" not in args.skip:
        child("check", ["check", "--n", str(args.check_n), "--cluster-n", str(args.cluster_check_n)], 150, 30)
    if "exact" not in args.skip:
        child("exact", ["exact", "--n", str(args.exact_n), "--faiss-s", str(args.faiss_s)], 200, 30)
    calib_n = args.calib_n
    path = str(scratch / f"emb{calib_n}.npy")
    if child("gen-calib", ["gen", "--n", str(calib_n), "--path", path], 60, 10) == 0:
        child("cluster-calib", ["cluster", "--path", path], 150, 30)
    for f in (path, path + ".planted.npz"):
        Path(f).unlink(missing_ok=True)
    # the largest scale size whose extrapolated time fits
    gen = records("gen", n=calib_n)
    cal = records("cluster", n=calib_n)
    plan = {"phase": "plan", "left_s": round(left()), "estimates_s": {}}
    chosen = None
    for n in sorted(args.scale_n, reverse=True):
        r = n / calib_n
        if gen and cal:
            tm = cal[-1]["t"]
            est = (
                gen[-1]["s"] * r
                + (tm["kmeans"] + tm["other"]) * r
                + tm["assign"] * r**1.1  # host rescoring ~ N; device products ~ N k
                + tm["search"] * r**1.25  # upload and re-check ~ N; device products ~ N^2 / k
                + 15
            )
        else:  # no calibration: a guess from the 2-core numbers / 16 cores
            est = 35e-6 * n
        plan["estimates_s"][n] = round(est)
        free = shutil.disk_usage(scratch).free
        if chosen is None and est <= left() - args.reserve_s - 10 and n * 512 * 2 * 1.05 < free:
            chosen = n
    plan["chosen_n"] = chosen
    emit(plan)
    if chosen:
        path = str(scratch / f"emb{chosen}.npy")
        if child("gen-scale", ["gen", "--n", str(chosen), "--path", path], left(), 10) == 0:
            child("cluster-scale", ["cluster", "--path", path], left(), 30)
        for f in (path, path + ".planted.npz"):
            Path(f).unlink(missing_ok=True)
    for n in args.extra_exact_n:  # more exact sizes while time is left (N^2 from the 1M run)
        ex = records("exact", n=args.exact_n)
        if not ex:
            break
        est = ex[-1]["gen_s"] * n / args.exact_n + ex[-1]["t"]["total"] * (n / args.exact_n) ** 2 + 20
        if est > left() - args.reserve_s:
            emit(
                {"phase": "skipped", "what": f"exact {n}", "estimate_s": round(est), "left_s": round(left())}
            )
            break
        child(f"exact-{n}", ["exact", "--n", str(n), "--faiss-s", "0"], left(), 10)
    emit({"phase": "end", "elapsed_s": round(time.monotonic() - start), "left_s": round(left())})


def cmd_summary(args) -> None:
    """The main numbers of --out, one line each (the JSON lines hold everything)."""
    with open(OUT_FILE) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    for r in recs:
        ph = r.get("phase")
        if ph == "check-exact":
            print(
                f"check exact {r['n']}: identical to FAISS {r['identical']} ({r['ours_pairs']} pairs); "
                f"ours {r['ours_s']} s, FAISS {r['faiss_cpu_s']} s ({r['speedup']}x)"
            )
        elif ph == "check-clustered":
            dev = next(v for k, v in r.items() if k.endswith("_s") and k != "cpu_s")
            print(
                f"check clustered {r['n']}: identical to the CPU {r['identical']} ({r['pairs']} pairs, "
                f"k {r['n_clusters']}); cpu {r['cpu_s']['total']} s, device {dev['total']} s"
            )
        elif ph == "exact":
            print(
                f"exact {r['n']}: {r['t']['total']} s (search {r['t']['search']}), {r['pairs']} pairs, "
                f"device {r['search_stats'].get('device')}"
            )
        elif ph == "exact-faiss":
            print(
                f"FAISS on {r['queries']} queries of {r['n']}: x N extrapolated {r['faiss_full_s_extrapolated']} s "
                f"= {r['speedup_extrapolated']}x ours; identical on the queries {r['identical_on_queries']}"
            )
        elif ph in ("gen", "plan", "skipped", "done", "end"):
            print(ph, {k: v for k, v in r.items() if k != "phase"})
        elif ph == "cluster":
            print(
                f"clustered {r['n']} memmap: {r['t']}, peak anon {r['peak_anon_mb']} MB (VmHWM {r['vmhwm_mb']}), "
                f"{r['pairs']} pairs, planted recall {r['planted_recall']}, k {r['stats']['n_clusters']}, "
                f"device {r['stats'].get('device')}"
            )


def main(argv=None) -> int:
    global OUT_FILE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "results.jsonl"))
    common.add_argument("--device", default="cuda")
    common.add_argument("--threshold", type=float, default=0.5)
    common.add_argument("--scratch", default=os.environ.get("SCRATCH", "/tmp/ddc"))
    p = sub.add_parser("env", parents=[common])
    p = sub.add_parser("check", parents=[common])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--cluster-n", type=int, default=100_000)
    p.add_argument("--block-rows", type=int, default=8192)
    p = sub.add_parser("exact", parents=[common])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--block-rows", type=int, default=8192)
    p.add_argument("--faiss-s", type=float, default=20.0, help="seconds for the FAISS query sample (0: none)")
    p = sub.add_parser("cpu-exact", parents=[common])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p = sub.add_parser("gen", parents=[common])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("cluster", parents=[common])
    p.add_argument("--path", required=True)
    p = sub.add_parser("summary", parents=[common])
    p = sub.add_parser("run", parents=[common])
    p.add_argument("--budget-s", type=float, default=470)
    p.add_argument("--reserve-s", type=float, default=10, help="kept back from every child's timeout")
    p.add_argument("--check-n", type=int, default=50_000)
    p.add_argument("--cluster-check-n", type=int, default=100_000)
    p.add_argument("--exact-n", type=int, default=1_000_000)
    p.add_argument("--faiss-s", type=float, default=15.0)
    p.add_argument("--calib-n", type=int, default=1_000_000)
    p.add_argument("--scale-n", type=int, nargs="+", default=[10_000_000, 5_000_000, 3_000_000, 2_000_000])
    p.add_argument("--extra-exact-n", type=int, nargs="*", default=[2_000_000, 4_000_000])
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "exact"],
                   help="phases already measured (check: identity with FAISS and the CPU path; exact: 1M)")
    args = ap.parse_args(argv)
    OUT_FILE = os.path.abspath(args.out)
    Path(OUT_FILE).parent.mkdir(parents=True, exist_ok=True)
    {
        "env": cmd_env,
        "check": cmd_check,
        "exact": cmd_exact,
        "cpu-exact": cmd_cpu_exact,
        "gen": cmd_gen,
        "cluster": cmd_cluster,
        "run": cmd_run,
        "summary": cmd_summary,
    }[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
