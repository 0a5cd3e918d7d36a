"""dedup on a GPU machine in one time-guarded run of `dedup_bench.py` children, each with a timeout from
what is left of --budget-s.  `python benchmarks/dedup_gpu_check.py --budget-s 470 --out $OUT` (as
benchmarks/device_check.sh runs it):

1. exact mode on the device at --exact-n (float16 in memory) against exact FAISS on --queries rows;
2. clustered mode (k = 4 sqrt(N); on a GPU "auto" would search up to 4M rows exactly) on a float16
   memory map at --calib-n, with peak anonymous memory;
3. the same at the largest --scale-n whose time, extrapolated from step 2, fits what is left;
4. more exact sizes (--extra-exact-n) while their N^2 estimate from step 1 fits.
Each child writes $OUT/<phase>-<N>.json and prints its table; $OUT/results.jsonl gets one line per child
as it ends. The identity of the device path with FAISS and the CPU path is tests/test_dedup_gpu.py.
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
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "dedup_bench.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON files")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scratch", default=os.environ.get("SCRATCH", "/tmp/ddc"), help="folder for the memmaps")
    ap.add_argument("--budget-s", type=float, default=470)
    ap.add_argument("--reserve-s", type=float, default=10, help="kept back from every child's timeout")
    ap.add_argument("--exact-n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000, help="FAISS query rows in step 1 (0: no FAISS)")
    ap.add_argument("--calib-n", type=int, default=1_000_000)
    ap.add_argument("--scale-n", type=int, nargs="*", default=[10_000_000, 5_000_000, 3_000_000, 2_000_000])
    ap.add_argument("--extra-exact-n", type=int, nargs="*", default=[2_000_000, 4_000_000])
    ap.add_argument("--skip", nargs="*", default=[], choices=["exact", "cluster"], help="steps already measured")
    args = ap.parse_args(argv)
    out, scratch, start = Path(args.out), Path(args.scratch), time.monotonic()
    for d in (out, scratch):
        d.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return args.budget_s - (time.monotonic() - start)

    def note(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def child(phase: str, n: int, extra: list[str], cap: float = math.inf) -> dict | None:
        """dedup_bench.py on n float16 rows in its own process -> its JSON (None: skipped, failed, cut)."""
        limit = min(cap, left() - args.reserve_s)
        if limit < 30:
            note({"phase": phase, "n": n, "skipped": True, "left_s": round(left())})
            return None
        path = out / f"{phase}-{n}.json"
        cmd = [sys.executable, str(BENCH), "--n", str(n), "--dtype", "float16", "--device", args.device,
               "--threads", str(os.cpu_count() or 1), "--json", str(path), *extra]
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        note({"phase": phase, "n": n, "rc": rc, "s": round(time.monotonic() - t0, 1), "limit_s": round(limit)})
        return json.loads(path.read_text()) if rc == 0 and path.is_file() else None

    def exact(n: int, queries: int) -> dict | None:
        methods = "ours-exact,faiss" if queries else "ours-exact"
        return child("exact", n, ["--methods", methods, "--exact-full-max", "0", "--queries", str(queries)])

    def cluster(n: int, cap: float = math.inf) -> dict | None:
        path = scratch / f"emb{n}.npy"
        try:
            return child("cluster", n, ["--methods", "ours", "--memmap", str(path),
                                        "--clusters", str(round(4 * math.sqrt(n)))], cap)
        finally:
            path.unlink(missing_ok=True)

    ex = None if "exact" in args.skip else exact(args.exact_n, args.queries)
    if "cluster" not in args.skip and (cal := cluster(args.calib_n, cap=300)):
        tm, gen = cal["results"]["ours"]["t"], cal["generate_s"]
        free = shutil.disk_usage(scratch).free
        for n in sorted(args.scale_n, reverse=True):  # the largest size whose estimate fits
            r = n / args.calib_n
            # generation, k-means and the rest ~ N; host rescoring of proposals ~ N; products ~ N^2 / k
            est = (gen + tm["kmeans"] + tm["keep"]) * r + tm["assign"] * r**1.1 + tm["search"] * r**1.25 + 15
            fits = est <= left() - args.reserve_s - 10 and n * 512 * 2 * 1.05 < free
            note({"phase": "plan", "n": n, "estimate_s": round(est), "left_s": round(left()), "chosen": fits})
            if fits:
                cluster(n)
                break
    for n in args.extra_exact_n if ex else []:  # N^2 from step 1
        est = ex["generate_s"] * n / args.exact_n + sum(ex["results"]["ours-exact"]["t"].values()) * (n / args.exact_n) ** 2 + 20
        if est > left() - args.reserve_s:
            note({"phase": "exact", "n": n, "skipped": True, "estimate_s": round(est), "left_s": round(left())})
            break
        exact(n, 0)
    note({"phase": "end", "elapsed_s": round(time.monotonic() - start), "left_s": round(left())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
