"""A killed `flowcurate run` started again with the same command: the rerun's wall time against an
uninterrupted run's, and whether its outputs are the same (shard bytes, manifest rows).

    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/pipeline_resume.py --work /tmp/resume --n 1024

Three runs of one command on the same sample data (tiny models, in process): uninterrupted; killed
with SIGKILL at --kill-at of the uninterrupted wall time, then rerun; killed as soon as pass 1 has
kept the records of every input file, then rerun. A rerun reuses pass 1's records of finished files
and pass 2's outputs of the files it finished (OUT/.pass1/, OUT/.pass2/).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import machine  # benchmarks/ is on sys.path when run as a script

BIN = Path(sys.executable).parent / "flowcurate"


def command(data: Path, out: Path) -> list[str]:
    return [str(BIN), "run", "--input", str(data / "raw" / "*.tar"), "--output", str(out), "--config", "tiny"]


def timed(cmd: list[str], until=None) -> float:
    """Wall seconds of `cmd`; killed (SIGKILL, its whole process group) once until(elapsed) is true."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None:
        if until is not None and until(time.perf_counter() - t0):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.05)
    return time.perf_counter() - t0


def outputs(out: Path) -> tuple[str, list]:
    shards = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))))
    rows = sorted(pq.read_table(out / "manifest").to_pylist(), key=lambda r: r["key"])
    return shards.hexdigest(), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--kill-at", type=float, default=0.6)
    a = ap.parse_args()
    from flowcurate.models.tiny.sample_data import write_sample_data

    data = a.work / f"data-{a.n}"
    if not (data / "raw").exists():
        write_sample_data(data, n=a.n, seed=0)
    files = len(list((data / "raw").glob("*.tar")))
    print(machine())
    whole = timed(command(data, a.work / "whole"))
    reference = outputs(a.work / "whole")
    print(f"uninterrupted: {whole:.1f} s ({a.n} images, {files} input files)")

    def pass1_done(_):
        return len(list((a.work / "after-pass1" / ".pass1").glob("*/*.parquet"))) >= files

    runs = ((f"killed at {a.kill_at:.0%}", a.work / "killed", lambda t: t >= a.kill_at * whole),
            ("killed after pass 1", a.work / "after-pass1", pass1_done))
    for name, out, until in runs:
        killed_after = timed(command(data, out), until)
        reused = len(list((out / ".pass1").glob("*/*.parquet")))
        finished = len(list((out / ".pass2" / "done").glob("*.pkl")))
        again = timed(command(data, out))
        same = outputs(out)
        print(f"{name}: killed after {killed_after:.1f} s with pass-1 records of {reused}/{files} files "
              f"and pass 2 done for {finished}; "
              f"rerun {again:.1f} s = {again / whole:.2f}x uninterrupted; shards byte-identical: "
              f"{same[0] == reference[0]}, manifest rows equal: {same[1] == reference[1]}")


if __name__ == "__main__":
    main()
