"""The trainer on one CUDA GPU, end to end, in one time-guarded run for a maintainer with a GPU machine:

    python benchmarks/trainer_gpu_check.py --out /tmp/trainer-gpu-check          # from the repository root
    python benchmarks/trainer_gpu_check.py --out /tmp/tgc --skip-mfu             # the trainer checks only

What it checks (each step one JSON line in OUT/results.jsonl, as it ends; the commands' output in
OUT/log.txt):
1. `train`: `python -m flowcurate.trainer train --device cuda` on the committed tiny shards
   (tests/data/golden), bf16 autocast on, for 4 steps with a checkpoint, validation and a sample grid
   every 2 steps. This runs the CUDA-only paths that the CPU tests cannot: the noise generator on the
   GPU, pinned batches copied with non_blocking, fused AdamW, bf16 autocast, the loss summed on the
   device and checked at log steps. Passes when it ends with checkpoints at steps 2 and 4, finite
   logged losses and a validation loss. (Grids need the autoencoder the shards' record names; on a
   machine without the tiny models built the trainer warns "sample grids disabled" and goes on, which
   is reported, not failed.)
2. `resume`: the same command with --max-steps 6 on the same run folder: it must say "resuming from"
   step 4 and end at step 6; and `uninterrupted`, a fresh 6-step run, against which the resumed
   weights are compared (max |difference| is reported; on CUDA it need not be 0: bf16 and
   non-deterministic kernels. On the CPU tests/test_train.py asserts bit-identity).
3. `compile`: step 1 again with --compile (torch.compile of the model), 4 steps.
4. `mfu`: `benchmarks/trainer_bench.py --mfu` eager and then compiled (MFU against --peak-tflops,
   default by GPU name: 989.4 TFLOP/s bf16 dense for H100 / H200).

Not part of `make test`. One GPU only: multi-GPU NCCL (torchrun with several CUDA ranks: set_device
per local rank, DDP device_ids, validation split over ranks) is written for but untested here; the
2-rank test in tests/test_train.py runs the same code on CPU ranks with gloo.

When `import flowcurate` fails (the repository not installed on the GPU image), the repository's
folders are linked as the `flowcurate` namespace under a temporary folder put on PYTHONPATH, as
benchmarks/device_check.sh does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"
PACKAGES = ("cli", "formats", "models", "captioning", "dedup", "trainer", "pipeline")
CONFIG = """[train]
model = "tiny"
batch_size = 4
shuffle_buffer = 4
lr = 1e-3
warmup_steps = 2
max_steps = 4
ema_decay = 0.9
shift = 1.0
checkpoint_every = 2
sample_every = 2
sample_steps = 4
log_every = 1
mixed_precision = true
seed = 0
"""


def python_env(work: Path) -> dict:
    """The environment for the trainer subprocesses: `flowcurate` importable, offline hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    probe = subprocess.run([sys.executable, "-c", "import flowcurate.trainer.train"], env=env, cwd=ROOT,
                           capture_output=True)
    if probe.returncode != 0:
        ns = work / "ns" / "flowcurate"
        ns.mkdir(parents=True, exist_ok=True)
        for name in PACKAGES:
            link = ns / name
            if not link.exists():
                link.symlink_to(ROOT / name)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(work / "ns"), str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class Check:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget_s = out, time.monotonic(), budget_s
        self.log = open(out / "log.txt", "a")
        self.failed = 0

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def record(self, name: str, ok: bool, **info) -> None:
        row = {"check": name, "ok": ok, **info}
        self.failed += not ok
        print(json.dumps(row), flush=True)
        with open(self.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def run(self, name: str, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess | None:
        timeout = min(timeout, self.left() - 5)
        if timeout < 10:
            self.record(name, False, skipped=f"out of budget ({self.left():.0f}s left)")
            return None
        self.log.write(f"\n== {name}: {' '.join(args)}\n")
        self.log.flush()
        t0 = time.monotonic()
        try:
            proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.log.write(f"{e.stdout or ''}\n{e.stderr or ''}\ntimed out after {timeout:.0f}s\n")
            self.record(name, False, timed_out_s=round(timeout))
            return None
        self.log.write(f"{proc.stdout}\n{proc.stderr}\nexit {proc.returncode} in {time.monotonic() - t0:.1f}s\n")
        self.log.flush()
        return proc


def log_rows(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_result(run: Path, proc: subprocess.CompletedProcess | None, steps: int) -> tuple[bool, dict]:
    """Whether a trainer run ended well (exit 0, a checkpoint at `steps`, finite losses, a val loss)."""
    if proc is None:
        return False, {}
    rows = log_rows(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    last = run / "checkpoints" / f"step-{steps:06d}"
    info = {"exit": proc.returncode, "losses": losses, "val_losses": vals,
            "samples_per_s": [r["samples_per_s"] for r in rows if "samples_per_s" in r][-1:],
            "grids": sorted(p.name for p in (run / "samples").glob("*.png")) if (run / "samples").exists() else [],
            "grids_disabled": "sample grids disabled" in proc.stderr,
            "stderr_tail": proc.stderr[-600:] if proc.returncode else ""}
    ok = (proc.returncode == 0 and last.exists() and bool(losses) and all(math.isfinite(v) for v in losses)
          and bool(vals) and all(math.isfinite(v) for v in vals))
    return ok, info


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.jsonl, log.txt and the run folders")
    ap.add_argument("--budget-s", type=float, default=540, help="seconds for the whole check (default 540)")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu for a dry run of this script")
    ap.add_argument("--skip-mfu", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="skip the compiled trainer run and compiled MFU")
    ap.add_argument("--mfu-depth", type=int, default=12, help="MM-DiT depth for the MFU step (default 12)")
    ap.add_argument("--mfu-batch", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: trainer_bench's, by GPU name)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="trainer-gpu-check-", dir=out))
    env = python_env(work)
    info = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
                           "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"],
                          env=env, capture_output=True, text=True)
    check.record("machine", info.returncode == 0, torch=info.stdout.strip())
    config = work / "tiny.toml"
    config.write_text(CONFIG)
    train = [sys.executable, "-m", "flowcurate.trainer", "train", "--shards", str(GOLDEN), "--config", str(config),
             "--device", args.device]
    if args.device == "cpu":
        train.append("--bf16-on-cpu")

    run = work / "run"
    proc = check.run("train", [*train, "--output", str(run)], env, 240)
    ok, details = train_result(run, proc, 4)
    check.record("train", ok, **details)

    proc = check.run("resume", [*train, "--output", str(run), "--max-steps", "6"], env, 180)
    resumed = proc is not None and "resuming from" in proc.stderr and "(step 4)" in proc.stderr
    ok, details = train_result(run, proc, 6)
    check.record("resume", ok and resumed, said_resuming=resumed, **details)

    fresh = work / "uninterrupted"
    proc = check.run("uninterrupted", [*train, "--output", str(fresh), "--max-steps", "6"], env, 180)
    ok, details = train_result(fresh, proc, 6)
    if ok and (run / "checkpoints" / "step-000006").exists():
        details["max_abs_weight_diff_vs_resumed"] = max_weight_difference(
            run / "checkpoints" / "step-000006", fresh / "checkpoints" / "step-000006")
    check.record("uninterrupted", ok, **details)

    if not args.skip_compile:
        compiled = work / "compiled"
        proc = check.run("compile", [*train, "--output", str(compiled), "--compile"], env, 300)
        ok, details = train_result(compiled, proc, 4)
        check.record("compile", ok, **details)

    if not args.skip_mfu:
        bench = [sys.executable, "-m", "benchmarks.trainer_bench", "--mfu", "--device", args.device,
                 "--depth", str(args.mfu_depth), "--batch", str(args.mfu_batch), "--repeats", "10"]
        if args.peak_tflops:
            bench += ["--peak-tflops", str(args.peak_tflops)]
        for mode, extra in (("eager", []), ("compiled", ["--compile"]))[: 1 if args.skip_compile else 2]:
            result = out / f"mfu-{mode}.json"
            proc = check.run(f"mfu_{mode}", [*bench, *extra, "--json", str(result)], env, 300)
            ok = proc is not None and proc.returncode == 0 and result.exists()
            check.record(f"mfu_{mode}", ok, **(json.loads(result.read_text())["mfu"] if ok else {}))
    check.record("end", check.failed == 0, failed=check.failed, seconds=round(time.monotonic() - check.t0))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
