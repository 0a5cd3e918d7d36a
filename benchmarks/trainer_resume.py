"""Trainer resume cost against progress: a run stopped at step 10 and one stopped at step 1000, each
resumed for one more step with the same command. With the data position seeked to (trainer/README.md,
"Resuming") both should take about the same time; when the position was a batch count the resume at
1000 re-read every earlier batch.

    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/trainer_resume.py --work /tmp/trainer-resume

Data: tiny curated shards made from the committed fixture (tests/data/golden: the tiny models'
record), its training samples copied under new keys into --shards shards of --per-shard samples, so
no model is built. Training: the tiny MM-DiT, batch 4, shuffle buffer 64, a checkpoint every 10 steps.
A run is trained to step 10 and copied, then trained on to --steps; each timing is a fresh copy of a
run resumed for one step (the whole `python -m flowcurate.trainer train` process: start-up, imports,
checkpoint load, data position, one step, one checkpoint), alternating the two, --repeats times.
Each trainer process gets OMP_NUM_THREADS=1 unless the environment sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import machine  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"
CONFIG = """[train]
model = "tiny"
batch_size = 4
shuffle_buffer = 64
lr = 1e-3
warmup_steps = 5
ema_decay = 0.9
shift = 1.0
checkpoint_every = 10
keep_checkpoints = 2
sample_every = 0
log_every = 50
mixed_precision = false
seed = 0
"""


def make_shards(out: Path, shards: int, per_shard: int) -> None:
    """OUT/ with conditioning.json/.npz of the fixture and `shards` train shards of its samples, re-keyed."""
    from flowcurate.formats import shards as S

    with tarfile.open(GOLDEN / "shards" / "train-000000.tar") as tar:
        members: dict[str, dict[str, bytes]] = {}
        for m in tar.getmembers():
            key, suffix = m.name.split(".", 1)
            members.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    samples = list(members.values())
    (out / "shards").mkdir(parents=True)
    for name in (S.RECORD_JSON, S.RECORD_NPZ):
        shutil.copyfile(GOLDEN / name, out / name)
    counts, n = {}, 0
    for s in range(shards):
        batch = []
        for _ in range(per_shard):
            sample, key = samples[n % len(samples)], f"{n:09d}"
            doc = {**json.loads(sample["json"]), "key": key}
            batch.append({**sample, "__key__": key, "json": json.dumps(doc, sort_keys=True).encode()})
            n += 1
        name = S.shard_name("train", s)
        (out / "shards" / name).write_bytes(S.tar_bytes(batch))
        counts[name] = per_shard
    S.write_index(out / "shards", counts, S.read_record(out).hash)


def train(data: Path, config: Path, run: Path, steps: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "flowcurate.trainer", "train", "--shards", str(data), "--config", str(config),
           "--output", str(run), "--max-steps", str(steps), "--device", "cpu"]
    # one torch thread per process unless told otherwise: on a shared 2-core box two spinning threads
    # made a tiny step 10x slower (as tests/conftest.py notes for xdist)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def resumed_once(work: Path, data: Path, config: Path, run: Path, at: int) -> tuple[float, str]:
    """Wall seconds of resuming a fresh copy of `run` (stopped at step `at`) for one step."""
    copy = work / f"resume-{at}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    seconds, err = train(data, config, copy, at + 1)
    found = re.search(r"loader workers read (\{.*?\}) samples", err)
    assert f"(step {at})" in err, err[-2000:]  # it did resume
    return seconds, found.group(1) if found else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1000, help="the late resume point (default 1000)")
    ap.add_argument("--early", type=int, default=10, help="the early resume point (default 10)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    data, config = args.work / "out", args.work / "train.toml"
    make_shards(data, args.shards, args.per_shard)
    config.write_text(CONFIG)
    early, late = args.work / "run-early", args.work / "run-late"
    seconds, _ = train(data, config, late, args.early)
    shutil.copytree(late, early)
    more, _ = train(data, config, late, args.steps)
    print(f"data: {args.shards} shards x {args.per_shard} samples; trained to step {args.steps} in "
          f"{seconds + more:.0f} s (batch 4: {args.steps * 4 / (args.shards * args.per_shard):.1f} epochs)")
    times: dict[int, list[float]] = {args.early: [], args.steps: []}
    reads: dict[int, str] = {}
    for _ in range(args.repeats):
        for at, run in ((args.early, early), (args.steps, late)):
            seconds, reads[at] = resumed_once(args.work, data, config, run, at)
            times[at].append(seconds)
    med = {at: statistics.median(t) for at, t in times.items()}
    for at in times:
        print(f"resume at step {at:>5}: median {med[at]:.2f} s of {[round(t, 2) for t in times[at]]}; "
              f"samples read before the first step (per worker): {reads[at]}")
    print(f"ratio late / early: {med[args.steps] / med[args.early]:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
