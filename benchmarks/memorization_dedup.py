"""Why curation matters (SD3 App. E.3): the same model memorizes repeated images when near-copies are
left in, and fewer when SSCD dedup removes them.

One command, on sample data repeated as web data repeats (`flowcurate.models.tiny.sample_data.
write_repeated_data`: `--repeated` originals present `--copies` times each as re-encoded, resized and
colour-jittered JPEGs that exact-hash dedup cannot remove, among `--unique` images seen once):

1. `flowcurate run` twice on the same raw shards: `dedup` (near-duplicate removal on, the default) and
   `raw` (`[dedup] near = false`: exact-pixel duplicates only, SD3's baseline);
2. `flowcurate train` of the same tiny MM-DiT on each, the same seed and steps (a checkpoint at each of
   `--steps`, so one training gives the sweep over steps);
3. `flowcurate memorization` on every checkpoint of both, with the same prompts (the captions of the
   repeated originals, and as many of unique ones as controls) and the same seeds;
4. WORK/report-TAG/ (TAG: model, batch, lr, steps): report.md and report.json (memorized prompts, generations in a clique of >= T and
   generations above the SSCD threshold, per run, per step and per prompt group), bars.png, and the
   pairs sheet of each run at the last step (pairs-dedup.png, pairs-raw.png).

Training is conditional only (`text_drop_prob = 0`, the original caption always) and sampling uses
guidance 1, as tests/test_memorization.py overfits: a caption then names one training image, which is
what a memorized prompt means. The SSCD threshold is the tiny preset's dedup threshold (0.75): the tiny
SSCD rates unrelated procedural images up to ~0.8 (BENCHMARKS.md, "Tiny models"), so the clique test
is the measure to read here.

    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/memorization_dedup.py --work /tmp/memdedup \
        --model d2 --unique 150 --repeated 2 --copies 64 --controls 4 --steps 300 600 900 --lr 2e-3 --seeds 12

(the settings BENCHMARKS.md records: the raw run memorizes both repeated images from step 600, the
dedup run nothing; ~8 minutes on 2 cores. The defaults are the cheaper tiny model, which did not
memorize.)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RUNS = ("dedup", "raw")  # [dedup] near = true | false
GROUPS = ("repeated", "unique")


def toml_text(sections: dict[str, dict]) -> str:
    """{section: {field: bool | int | float | str | list}} -> TOML text (None values are left out)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, (str, list)) else repr(v)

    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in fields.items() if v is not None) + "\n"
                   for name, fields in sections.items())


def write_config(path: Path, args, near: bool) -> Path:
    """The tiny preset with this experiment's resolution, dedup mode and training recipe."""
    import tomllib

    preset = tomllib.loads(_preset_text("tiny"))
    every = math.gcd(*args.steps)  # one run with a checkpoint at every checked step
    # the synthetic captions are never trained on (orig_caption_prob = 1), so the captioner writes few
    # tokens; T5 at 16 tokens holds these captions (~10-20 tokens) and shortens every training step
    preset["pipeline"].update(resolution=args.resolution, min_size=args.resolution, val_fraction=0.0,
                              t5_max_length=args.t5_length, caption_max_new_tokens=4)
    preset["dedup"]["near"] = near
    preset["train"] = {
        "model": args.model, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 20,
        "lr_schedule": "cosine", "max_steps": max(args.steps), "ema_decay": args.ema_decay, "shift": 1.0,
        "checkpoint_every": every, "sample_every": 0, "log_every": 50, "mixed_precision": False, "seed": 0,
        "orig_caption_prob": 1.0, "text_drop_prob": 0.0, "keep_checkpoints": max(args.steps) // every + 1}
    path.write_text(toml_text(preset))
    return path


def _preset_text(name: str) -> str:
    from importlib import resources

    return resources.files("flowcurate.formats.presets").joinpath(f"{name}.toml").read_text()


def prompts_of(truth: dict, controls: int) -> list[tuple[str, str, str]]:
    """(caption, group, key of the original): every repeated original's caption, then `controls` unique
    originals' (the first by key)."""
    repeated = {g["original"] for g in truth["duplicate_groups"]}
    members = repeated | {k for g in truth["duplicate_groups"] for k in g["copies"]}
    unique = sorted(k for k in truth["keys"] if k not in members)[:controls]
    return ([(truth["captions"][k], "repeated", k) for k in sorted(repeated)]
            + [(truth["captions"][k], "unique", k) for k in unique])


def step_folders(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def summarise(report: Path, prompts: list[tuple[str, str, str]], truth: dict) -> dict:
    """Counts per prompt group from one memorization report (report.parquet + summary.json)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(report / "report.parquet").to_pylist()
    group = {text: g for text, g, _ in prompts}
    summary = json.loads((report / "summary.json").read_text())
    out = {}
    for g in GROUPS:
        mine = [r for r in rows if group[r["prompt"]] == g]
        texts = {r["prompt"] for r in mine}
        out[g] = {
            "prompts": len(texts),
            "memorized_prompts": len({r["prompt"] for r in mine if r["prompt_memorized"]}),
            "memorized_generations": sum(r["memorized"] for r in mine),
            "flagged_generations": sum(r["flagged"] for r in mine),
            "generations": len(mine),
            # the nearest training image shows the prompt's scene (its original or one of its copies)
            "nearest_is_prompt_scene": sum(truth["captions"].get(r["nearest_key"]) == r["prompt"] for r in mine),
            "largest_clique": max((r["clique_size"] for r in mine), default=0),
            "undecided": sum(r["clique_undecided"] for r in mine),
        }
    out["similarity"] = summary["retrieval"]["similarity"]
    out["background"] = summary["retrieval"]["background"]
    out["training_images"] = summary["training_images"]
    return out


def bar_chart(path: Path, results: dict, step: int, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.38
    for ax, (metric, title, total) in zip(axes, (
            ("memorized_prompts", f"prompts memorized (clique >= {args.min_clique} of {args.seeds})", "prompts"),
            ("largest_clique", f"largest clique found (T = {args.min_clique})", None),
            ("flagged_generations", f"generations above SSCD {args.threshold:g}", "generations"))):
        for i, run in enumerate(RUNS):
            r = results[run][str(step)]
            vals = [r[g][metric] for g in GROUPS]
            bars = ax.bar(np.arange(len(GROUPS)) + (i - 0.5) * width, vals, width,
                          label=f"{run} ({r['training_images']} training images)")
            for b, g in zip(bars, GROUPS):
                label = f"{r[g][metric]}/{r[g][total]}" if total else str(r[g][metric])
                ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        if total is None:
            ax.axhline(args.min_clique, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1 if total else args.min_clique + 1))
        ax.set_xticks(np.arange(len(GROUPS)), [f"{g} images' captions" for g in GROUPS])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.model}, {step} steps; {args.repeated} images x {args.copies} near-copies among "
                 f"{args.unique} unique", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_md(results: dict, args, timings: dict, curation: dict, machine: str) -> str:
    lines = ["# Memorization with and without near-duplicate removal\n",
             f"settings: {json.dumps(vars(args), default=str)}\n", f"machine: {machine}\n",
             "| run | kept | removed as duplicates | step | group | memorized prompts | generations in a clique >= T | "
             "largest clique | generations > SSCD threshold | nearest training image shows the prompt's scene |",
             "|---" * 10 + "|"]
    for run in RUNS:
        c = curation[run]
        for step, r in results[run].items():
            for g in GROUPS:
                x = r[g]
                lines.append(f"| {run} | {c['kept']} | {c['duplicate']} | {step} | {g} | {x['memorized_prompts']}/{x['prompts']} | "
                             f"{x['memorized_generations']}/{x['generations']} | {x['largest_clique']} | "
                             f"{x['flagged_generations']}/{x['generations']} | "
                             f"{x['nearest_is_prompt_scene']}/{x['generations']} |")
    lines.append("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for data, curated outputs, runs and the report")
    p.add_argument("--unique", type=int, default=200, help="originals present once")
    p.add_argument("--repeated", type=int, default=8, help="originals present many times")
    p.add_argument("--copies", type=int, default=16, help="how many times each repeated original is present")
    p.add_argument("--controls", type=int, default=None, help="unique captions prompted (default: --repeated)")
    p.add_argument("--seed", type=int, default=0, help="sample data seed")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--model", default="tiny", help="MM-DiT size (models/mmdit.py SIZES)")
    p.add_argument("--t5-length", type=int, default=16, help="[pipeline] t5_max_length (77 + this text tokens)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, nargs="+", default=[1000], help="checkpoints checked (trained to the last)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--seeds", type=int, default=20, help="generations per prompt (K)")
    p.add_argument("--min-clique", type=int, default=10, help="T (SD3 / Carlini et al.: 10)")
    p.add_argument("--sample-steps", type=int, default=16, help="Euler steps per generation")
    p.add_argument("--threshold", type=float, default=0.75, help="SSCD threshold (the tiny preset's dedup threshold)")
    p.add_argument("--keep", action="store_true", help="reuse curated outputs and runs already in --work")
    args = p.parse_args(argv)
    args.steps = sorted(set(args.steps))
    args.controls = args.repeated if args.controls is None else args.controls

    from common import load_now, machine

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from flowcurate.models.tiny.sample_data import write_repeated_data
    from flowcurate.pipeline.run import run as curate
    from flowcurate.trainer.cli import main as trainer

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0, timings = time.perf_counter(), {}
    load0 = load_now()
    data = work / "data"
    if not (args.keep and (data / "truth.json").exists()):
        shutil.rmtree(data, ignore_errors=True)
        write_repeated_data(data, args.unique, args.repeated, args.copies, args.seed)
    truth = json.loads((data / "truth.json").read_text())
    prompts = prompts_of(truth, args.controls)
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("".join(text + "\n" for text, _, _ in prompts))
    timings["data"] = time.perf_counter() - t0

    curation, results = {}, {}
    # curated outputs depend on the data only (reused with --keep); runs and reports on the recipe too
    tag = f"{args.model}-b{args.batch_size}-lr{args.lr:g}-{max(args.steps)}"
    for run in RUNS:
        cfg = write_config(work / f"{run}-{tag}.toml", args, near=run == "dedup")
        out, run_dir = work / f"curated-{run}", work / f"run-{run}-{tag}"
        t = time.perf_counter()
        if not (args.keep and (out / "stats.json").exists()):
            print(f"[{run}] flowcurate run --config {cfg}", flush=True)
            curate(["--input", str(data / "raw" / "*.tar"), "--output", str(out), "--config", str(cfg), "--overwrite"],
                   log=lambda *a, **k: None)
        stats = json.loads((out / "stats.json").read_text())
        curation[run] = {"inputs": stats["inputs"], **stats["status"]}
        timings[f"curate {run}"] = time.perf_counter() - t

        t = time.perf_counter()
        if not (args.keep and len(step_folders(run_dir)) >= len(args.steps)):
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[{run}] flowcurate train ({max(args.steps)} steps, {args.model})", flush=True)
            if trainer(["train", "--shards", str(out), "--config", str(cfg), "--output", str(run_dir),
                        "--device", "cpu"]) != 0:
                raise RuntimeError(f"training {run} failed")
        timings[f"train {run}"] = time.perf_counter() - t

        t = time.perf_counter()
        results[run] = {}
        for step_dir in step_folders(run_dir):
            step = int(step_dir.name.split("-")[1])
            if step not in args.steps:
                continue
            report = work / "memorization" / f"{run}-{tag}-{step}"
            print(f"[{run}] flowcurate memorization --checkpoint {step_dir}", flush=True)
            rc = trainer(["memorization", "--checkpoint", str(step_dir), "--curated", str(out), "--output",
                          str(report), "--prompts", str(prompt_file), "--seeds", str(args.seeds), "--min-clique",
                          str(args.min_clique), "--steps", str(args.sample_steps), "--cfg", "1", "--threshold",
                          str(args.threshold), "--background-queries", "500", "--device", "cpu"])
            if rc != 0:
                raise RuntimeError(f"memorization of {run} at step {step} failed")
            results[run][str(step)] = summarise(report, prompts, truth)
        timings[f"memorization {run}"] = time.perf_counter() - t

    out = work / f"report-{tag}"
    out.mkdir(exist_ok=True)
    last = max(args.steps)
    for run in RUNS:
        shutil.copyfile(work / "memorization" / f"{run}-{tag}-{last}" / "pairs.png", out / f"pairs-{run}.png")
    bar_chart(out / "bars.png", results, last, args)
    timings["total"] = time.perf_counter() - t0
    doc = {"settings": vars(args) | {"work": str(work)}, "machine": machine(), "load": [load0, load_now()],
           "curation": curation, "results": results, "seconds": {k: round(v, 1) for k, v in timings.items()},
           "prompts": [{"text": t, "group": g, "key": k} for t, g, k in prompts]}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "report.md").write_text(report_md(results, args, timings, curation, doc["machine"]))
    print((out / "report.md").read_text())
    print(f"load average {load0} -> {load_now()}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
