"""Build every tiny model from scratch into a temporary folder and print time and quality per part.

    OPENBLAS_NUM_THREADS=1 python benchmarks/tiny_models_bench.py [--seed 0]

Budget: the whole build in <= 5 minutes on 2 cores, under 50 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import machine, peak_rss_mb  # benchmarks/ is on sys.path when run as a script

from flowcurate.models.tiny import build

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        report = build(Path(d) / "m", seed=args.seed, log=lambda m: None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = sum(p.stat().st_size for p in (Path(d) / "m").rglob("*") if p.is_file())
    print(f"total: {wall:.1f} s wall ({wall / 300:.2f}x the 300 s budget), {cpu:.1f} s CPU, "
          f"{size / 1e6:.1f} MB ({size / 50e6:.2f}x the 50 MB budget), peak RSS {peak_rss_mb():.0f} MB")
    for part in ("sd3", "sscd", "captioner"):
        print(f"  {part}: {json.dumps(report[part], sort_keys=True)}")


if __name__ == "__main__":
    main()
