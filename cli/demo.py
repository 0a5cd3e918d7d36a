"""`flowcurate demo`: the user journey, offline, on tiny models, ending with where everything is.

Today: tiny models -> sample data -> `flowcurate dedup` on the raw shards. Later stages (run, train,
sample, memorization) join as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dedup.cli import main as dedup_main
from models.config import load_config
from models.sample_data import write_sample_data
from models.tiny import write_tiny_models


def run_demo(output: Path, n: int = 512, seed: int = 0) -> dict[str, Path]:
    """Run every available stage into `output`; returns the paths it printed (each exists)."""
    output = Path(output).resolve()
    t0 = time.perf_counter()
    print(f"[demo] 1/3 tiny models (built once into the cache, then copied) -> {output / 'models'}")
    models = write_tiny_models(output / "models", seed=seed)
    report = json.loads((models / "tiny_report.json").read_text())
    print(f"[demo] 2/3 sample data: {n} procedural images with planted duplicates -> {output / 'data'}")
    truth = write_sample_data(output / "data", n=n, seed=seed)
    threshold = load_config("tiny").dedup.threshold
    print(f"[demo] 3/3 flowcurate dedup (SSCD near-duplicates, tiny preset threshold {threshold}) -> {output / 'dedup'}")
    rc = dedup_main(["--input", str(output / "data" / "raw"), "--output", str(output / "dedup"),
                     "--config", "tiny", "--sscd", str(models / "sscd.torchscript.pt"), "--quiet"])
    if rc != 0:
        raise RuntimeError(f"flowcurate dedup failed with exit code {rc}")
    summary = json.loads((output / "dedup" / "summary.json").read_text())
    paths = {
        "tiny models": models,
        "tiny model report": models / "tiny_report.json",
        "raw shards": output / "data" / "raw",
        "truth": output / "data" / "truth.json",
        "dedup decisions": output / "dedup" / "dedup.parquet",
        "dedup summary": output / "dedup" / "summary.json",
        "duplicate sheet": output / "dedup" / "duplicates.png",
    }
    copies = sum(len(g["copies"]) for g in truth["duplicate_groups"])
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s")
    print(f"  tiny AE reconstruction: {report['sd3'].get('ae_psnr_db', '?')} dB PSNR; SSCD copies found: "
          f"{report['sscd'].get('copy_above_0.75', '?')}, unrelated kept apart: "
          f"{report['sscd'].get('unrelated_below_0.3', '?')}")
    print(f"  sample data: {truth['n']} samples, {len(truth['duplicate_groups'])} duplicate groups "
          f"({copies} copies), {len(truth['broken'])} broken")
    print(f"  dedup: {json.dumps(summary.get('counts', {}), sort_keys=True)}")
    for name, p in paths.items():
        print(f"  {name + ':':20s} {p}")
    print("  try training: flowcurate train --shards tests/data/golden --output run/ --max-steps 200, then\n"
          "  flowcurate sample --checkpoint run/ --prompt 'a red circle' --output grid.png\n"
          "  next (arriving with later issues): flowcurate run (curated shards) -> train -> memorization")
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise RuntimeError(f"demo outputs missing: {missing}")
    return paths
