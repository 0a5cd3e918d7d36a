"""`flowcurate run` at the sizes users run: wall time and peak memory per image, and shuffle bytes per
input, on procedural sample data with the tiny models, in process (Beam's FnApiRunner).

    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/pipeline_scale.py --work /tmp/scale \
        --n 1024 4096 32768 --resolution 64 [--baseline-src /path/to/old/checkout]

Each run is a fresh subprocess (peak RSS from the kernel's rusage of that child). Sample data is made
once per size under WORK/data-N. With --baseline-src, the same data also runs through another
checkout's pipeline (`python -m pipeline` with that checkout on PYTHONPATH: the layout before the
flowcurate namespace), side by side, for the sizes given in --baseline-n.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import machine  # benchmarks/ is on sys.path when run as a script

CHILD = """
import json, sys
from flowcurate.pipeline.run import run
s = run(sys.argv[1:], log=lambda *a, **k: None)
sb = s.get("shuffle_bytes") or {}
print("STATS " + json.dumps({"inputs": s["inputs"], "status": s["status"], "shuffle_bytes": sum(sb.values()),
                             "largest_shuffle": max(sb.items(), key=lambda kv: kv[1]) if sb else None}))
"""


def measured(cmd: list[str], env: dict) -> dict:
    """Run `cmd` as this process's only child; wall seconds, its peak RSS (MB), its STATS line if any.
    (The kernel's RUSAGE_CHILDREN peak is the largest waited-for child: main() runs each measurement
    in a fresh process of its own, so that is this one.)"""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stats = next((json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("STATS ")), None)
    return {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "stats": stats}


def ensure_data(work: Path, n: int, env: dict) -> Path:
    data = work / f"data-{n}"
    if not (data / "truth.json").is_file():
        subprocess.run([sys.executable, "-m", "flowcurate.models", "sample-data", "--output", str(data), "--n", str(n)],
                       env=env, check=True, capture_output=True)
    return data


def one(args) -> int:
    """Internal: one measured run in this (fresh) process, printed as JSON (keeps rusage per run)."""
    env = dict(os.environ)
    if args.baseline_src:
        env["PYTHONPATH"] = args.baseline_src
        cmd = [sys.executable, "-m", "pipeline"]
    else:
        cmd = [sys.executable, "-c", CHILD]
    cmd += ["--input", f"{args.data}/raw/*.tar", "--output", args.out, "--config", "tiny", "--overwrite",
            "--resolution", str(args.resolution)]
    print(json.dumps(measured(cmd, env)))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--resolution", type=int, nargs="+", default=[64])
    p.add_argument("--baseline-src", default=None, help="another checkout to run side by side (old layout)")
    p.add_argument("--baseline-n", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.resolution = args.resolution[0]
        return one(args)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(machine())
    print("| pipeline | images | resolution | wall s | ms / image | peak RSS MB | KB RSS / image | "
          "shuffle KB / input | kept / dup / rejected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        data = ensure_data(args.work, n, env)
        variants = [("ours", None)] + ([("baseline", args.baseline_src)] if args.baseline_src and n in args.baseline_n else [])
        for res in args.resolution:
            for name, src in variants:
                cmd = [sys.executable, __file__, "--one", "--work", str(args.work), "--data", str(data),
                       "--out", str(args.work / f"out-{name}-{n}-{res}"), "--resolution", str(res)]
                if src:
                    cmd += ["--baseline-src", src]
                r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                s = r["stats"] or {}
                status = s.get("status")
                print(f"| {name} | {n} | {res} | {r['wall_s']:.1f} | {1000 * r['wall_s'] / n:.1f} | "
                      f"{r['peak_rss_mb']:.0f} | {1024 * r['peak_rss_mb'] / n:.0f} | "
                      f"{s['shuffle_bytes'] / 1024 / s['inputs']:.1f} | " if s else "- | ", end="")
                print(f"{status['kept']} / {status['duplicate']} / {status['rejected']} |" if status else "- |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
