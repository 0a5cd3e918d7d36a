"""`flowcurate demo`: the user journey, offline, on tiny models, ending with where everything is.

    tiny models -> sample data -> flowcurate run -> flowcurate train -> flowcurate sample
    -> flowcurate memorization

Every step runs the same command a user types (in process), on the demo's own folders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flowcurate.formats.config import load_config
from flowcurate.models.tiny import write_tiny_models
from flowcurate.models.tiny.sample_data import write_sample_data

TRAIN_STEPS = 300
STEPS = 6


def _step(i: int, text: str) -> float:
    print(f"\n[demo] {i}/{STEPS} {text}", flush=True)
    return time.perf_counter()


def run_demo(output: Path, n: int = 512, seed: int = 0, train_steps: int = TRAIN_STEPS) -> dict[str, Path]:
    """Run the journey into `output`; returns the paths it printed (each exists)."""
    from flowcurate.pipeline.run import run as curate
    from flowcurate.trainer.cli import main as trainer_main  # python -m flowcurate.trainer train|sample|...

    output = Path(output).resolve()
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    t = _step(1, f"tiny models (built once into the cache, then copied) -> {output / 'models'}")
    models = write_tiny_models(output / "models", seed=seed)
    times["models"] = time.perf_counter() - t

    t = _step(2, f"sample data: {n} procedural images with planted duplicates and broken samples -> {output / 'data'}")
    truth = write_sample_data(output / "data", n=n, seed=seed)
    times["data"] = time.perf_counter() - t

    curated = output / "curated"
    t = _step(3, f"flowcurate run --input {output / 'data' / 'raw'}/*.tar --output {curated} --config tiny")
    stats = curate(["--input", str(output / "data" / "raw" / "*.tar"), "--output", str(curated), "--config", "tiny",
                    "--overwrite"], log=lambda *a, **k: None)
    times["run"] = time.perf_counter() - t
    s = stats["status"]
    print(f"[demo] inputs {stats['inputs']}: kept {s['kept']}, duplicate {s['duplicate']}, rejected {s['rejected']} "
          f"({', '.join(f'{k} {v}' for k, v in stats['reasons'].items())})")

    run_dir = output / "train-run"
    t = _step(4, f"flowcurate train --shards {curated} --config tiny --output {run_dir} --max-steps {train_steps}")
    rc = trainer_main(["train", "--shards", str(curated), "--config", "tiny", "--output", str(run_dir),
                     "--max-steps", str(train_steps), "--sample-every", "0", "--device", "cpu"])
    if rc != 0:
        raise RuntimeError(f"flowcurate train failed with exit code {rc}")
    times["train"] = time.perf_counter() - t

    grid = output / "samples.png"
    t = _step(5, f"flowcurate sample --checkpoint {run_dir} --output {grid}")
    rc = trainer_main(["sample", "--checkpoint", str(run_dir), "--output", str(grid), "--seeds", "4", "--device", "cpu"])
    if rc != 0:
        raise RuntimeError(f"flowcurate sample failed with exit code {rc}")
    times["sample"] = time.perf_counter() - t

    report = output / "memorization"
    t = _step(6, f"flowcurate memorization --checkpoint {run_dir} --curated {curated} --output {report}")
    # a few prompts (the most-duplicated captions first) x 10 seeds (SD3's clique size) keep this step near a minute; the
    # threshold is the tiny preset's dedup threshold: the tiny SSCD rates unrelated images up to ~0.8
    rc = trainer_main(["memorization", "--checkpoint", str(run_dir), "--curated", str(curated), "--output", str(report),
                            "--top-duplicated", "4", "--random-prompts", "4", "--seeds", "10",
                            "--threshold", str(load_config("tiny").dedup.threshold), "--device", "cpu"])
    if rc != 0:
        raise RuntimeError(f"flowcurate memorization failed with exit code {rc}")
    times["memorization"] = time.perf_counter() - t
    mem = json.loads((report / "summary.json").read_text())

    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [e["loss"] for e in log if "loss" in e]
    planted = sum(len(g["copies"]) for g in truth["duplicate_groups"])
    paths = {
        "tiny models": models,
        "raw shards": output / "data" / "raw",
        "truth": output / "data" / "truth.json",
        "curated shards": curated / "shards",
        "manifest": curated / "manifest",
        "pipeline stats": curated / "stats.json",
        "loss curve": run_dir / "loss.png",
        "training log": run_dir / "log.jsonl",
        "sample grid": grid,
        "memorization report": report / "report.parquet",
        "memorization summary": report / "summary.json",
    }
    if (report / "pairs.png").exists():
        paths["flagged pairs"] = report / "pairs.png"
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    print(f"  curation: {stats['inputs']} inputs -> {s['kept']} kept; dedup removed {s['duplicate']} "
          f"({planted} copies were planted); {s['rejected']} rejected ({len(truth['broken'])} broken planted)")
    if losses:
        print(f"  training: {train_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"  memorization: {_mem_line(mem)}")
    for name, p in paths.items():
        print(f"  {name + ':':22s} {p}")
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise RuntimeError(f"demo outputs missing: {missing}")
    return paths


def _mem_line(summary: dict) -> str:
    r, c = summary["retrieval"], summary["clique"]
    return (f"{summary['generations']} generations for {summary['prompts']} prompts: {r['flagged']} above SSCD "
            f"{r['threshold']} (median top-1 {r['similarity']['p50']:.2f} vs training-to-training "
            f"{r['background']['p50']:.2f}); {c['memorized_prompts']} prompts memorized by the clique test")
