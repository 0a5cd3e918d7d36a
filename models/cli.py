"""Subcommands owned by `models`: `tiny-models` and `sample-data`.

`flowcurate` (cli/) mounts these parsers; `python -m flowcurate.models` runs them alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowcurate.formats.args import ArgumentParser

RAW = argparse.RawDescriptionHelpFormatter


def _tiny_models(args) -> int:
    from flowcurate.models.tiny import ROLES, write_tiny_models

    out = write_tiny_models(Path(args.output), seed=args.seed).resolve()
    report = json.loads((out / "tiny_report.json").read_text())
    print(json.dumps(report, indent=2, sort_keys=True))
    print(f"tiny models (seed {args.seed}) written to {out}:")
    for role in ROLES:
        print(f"  {out / role}")
    return 0


def _sample_data(args) -> int:
    if args.edit:
        from flowcurate.models.tiny.edit_triplets import write_edit_data

        doc = write_edit_data(Path(args.output), n=args.n, seed=args.seed)
        out = Path(args.output).resolve()
        planted = sum(1 for r in doc["rows"].values() if r["plant"])
        print(f"edit data: {doc['n']} triplets in {out / 'raw'} ({planted} planted duplicates and broken triplets)")
        print(f"truth: {out / 'truth.json'}")
        return 0
    from flowcurate.models.tiny.sample_data import write_sample_data

    truth = write_sample_data(Path(args.output), n=args.n, seed=args.seed)
    out = Path(args.output).resolve()
    copies = sum(len(g["copies"]) for g in truth["duplicate_groups"])
    print(f"sample data: {truth['n']} samples in {out / 'raw'} "
          f"({len(truth['duplicate_groups'])} duplicate groups with {copies} planted copies, "
          f"{len(truth['broken'])} broken samples)")
    print(f"truth: {out / 'truth.json'}")
    return 0


def add_parsers(sub) -> None:
    """Add `tiny-models` and `sample-data` to an argparse subparsers object."""
    p = sub.add_parser("tiny-models", help="write the tiny offline models (real on-disk layouts)",
                       description="Write tiny models in exactly the on-disk layouts of the real ones: "
                                   "DIR/sd3 (diffusers StableDiffusion3Pipeline folder), "
                                   "DIR/sscd.torchscript.pt (SSCD TorchScript interface), DIR/captioner "
                                   "(LLaVA-style VLM). Built once per seed into $FLOWCURATE_CACHE "
                                   "(default ~/.cache/flowcurate), then copied.",
                       epilog="example:\n  flowcurate tiny-models --output models/ --seed 0", formatter_class=RAW)
    p.add_argument("--output", required=True, help="folder to write into")
    p.add_argument("--seed", type=int, default=0, help="build seed (same seed, same weights)")
    p.set_defaults(func=_tiny_models)

    p = sub.add_parser("sample-data", help="write procedural raw shards with planted duplicates",
                       description="Write raw shards as img2dataset does (DIR/raw/NNNNN.tar with "
                                   "{key}.jpg|png, .txt, .json) of procedural images with truthful "
                                   "captions, planted near-duplicates and broken samples, and "
                                   "DIR/truth.json listing what was planted.",
                       epilog="examples:\n  flowcurate sample-data --output data/ --n 512 --seed 0\n"
                              "  flowcurate sample-data --edit --output edits/ --n 64   # InstructPix2Pix-style Parquet\n"
                              "  flowcurate run --task edit --input 'edits/raw/*.parquet' --output curated-edits "
                              "--config tiny",
                       formatter_class=RAW)
    p.add_argument("--output", required=True, help="folder to write into")
    p.add_argument("--n", type=int, default=512, help="number of samples (default 512)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same bytes)")
    p.add_argument("--edit", action="store_true",
                   help="write edit triplets instead: DIR/raw/part-NNNNN.parquet in the public InstructPix2Pix "
                        "layout (original_image, edit_prompt, edited_image) with planted duplicates and broken "
                        "triplets, and DIR/truth.json")
    p.set_defaults(func=_sample_data)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m flowcurate.models", description="Tiny models and sample data.",
                                     epilog="examples:\n  python -m flowcurate.models tiny-models --output m/\n"
                                            "  python -m flowcurate.models sample-data --output data/ --n 64",
                                     formatter_class=RAW)
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
