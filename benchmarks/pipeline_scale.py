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
import subprocess
import sys
from pathlib import Path

from common import machine, run_measured  # benchmarks/ is on sys.path when run as a script

CHILD = """
import json, sys
from flowcurate.pipeline.run import run
s = run(sys.argv[1:], log=lambda *a, **k: None)
sb = s.get("shuffle_bytes") or {}
print("STATS " + json.dumps({"inputs": s["inputs"], "status": s["status"], "shuffle_bytes": sum(sb.values()),
                             "largest_shuffle": max(sb.items(), key=lambda kv: kv[1]) if sb else None}))
"""


def ensure_data(work: Path, n: int, env: dict) -> Path:
    data = work / f"data-{n}"
    if not (data / "truth.json").is_file():
        subprocess.run([sys.executable, "-m", "flowcurate.models", "sample-data", "--output", str(data), "--n", str(n)],
                       env=env, check=True, capture_output=True)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--resolution", type=int, nargs="+", default=[64])
    p.add_argument("--baseline-src", default=None, help="another checkout to run side by side (old layout)")
    p.add_argument("--baseline-n", type=int, nargs="*", default=[1024, 4096])
    args = p.parse_args(argv)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(machine())
    print("| pipeline | images | resolution | wall s | ms / image | peak RSS MB | KB RSS / image | "
          "shuffle KB / input | kept / dup / rejected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        data = ensure_data(args.work, n, env)
        variants = [("ours", None)] + ([("baseline", args.baseline_src)] if args.baseline_src and n in args.baseline_n else [])
        for res in args.resolution:
            for name, src in variants:  # the baseline: `python -m pipeline` of the old checkout on PYTHONPATH
                cmd = [sys.executable, "-m", "pipeline"] if src else [sys.executable, "-c", CHILD]
                cmd += ["--input", f"{data}/raw/*.tar", "--output", str(args.work / f"out-{name}-{n}-{res}"),
                        "--config", "tiny", "--overwrite", "--resolution", str(res)]
                log = args.work / f"out-{name}-{n}-{res}.log"
                r = run_measured(cmd, {**env, "PYTHONPATH": src} if src else env, log)
                if r["rc"] != 0:
                    raise RuntimeError(f"{cmd[:4]}... failed ({r['rc']}):\n{log.read_text()[-3000:]}")
                r["stats"] = next((json.loads(line[6:]) for line in log.read_text().splitlines()
                                   if line.startswith("STATS ")), None)
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
