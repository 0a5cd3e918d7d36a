"""The `flowcurate` umbrella command: parses, resolves config, dispatches.

Each subcommand also lives in its package (`python -m flowcurate.pipeline`, `python -m flowcurate.dedup`, `python -m flowcurate.trainer`,
`python -m flowcurate.models`); this module only wires them under one name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowcurate.dedup.cli import add_parser as add_dedup_parser
from flowcurate.formats.args import ArgumentParser
from flowcurate.models.cli import add_parsers as add_model_parsers
from flowcurate.pipeline.fit import add_filters_parser
from flowcurate.trainer.cli import (
    add_edit_parser,
    add_memorization_parser,
    add_sample_parser,
    add_train_parser,
)
from flowcurate.trainer.export import add_export_parser

EPILOG = """\
examples:
  flowcurate demo --output demo-out/                 # the journey offline on tiny models (make demo)
  flowcurate tiny-models --output models/            # tiny offline models in the real layouts
  flowcurate sample-data --output data/ --n 512      # raw img2dataset-style shards + truth.json
  flowcurate config --config tiny                    # print a resolved config (preset or TOML path)
  flowcurate dedup --input 'imgs/**/*.jpg' --output dd/   # SSCD near-duplicates (see dedup --help)
  flowcurate run --input 'raw/*.tar' --output out/ --config tiny   # curate with Apache Beam (see run --help)
  flowcurate train --shards out/ --config tiny --output run/            # MM-DiT on curated shards
  flowcurate sample --checkpoint run/ --prompt 'a red circle' --output grid.png
  flowcurate train --edit --shards edits/ --config tiny --output edit-run/ --init-from run/   # InstructPix2Pix
  flowcurate edit --checkpoint edit-run/ --image in.png --instruction 'make the circle red' --output out.png
  flowcurate memorization --checkpoint run/ --curated out/ --output report/   # SD3 App. E.3 check
  flowcurate export run/ --output sd3-transformer/ [--pipeline]   # to diffusers' format
  flowcurate filters fit --images labels.csv --config my.toml --output head.safetensors   # a probe filter
"""

def _config(args) -> int:
    from flowcurate.formats.config import load_config, to_dict

    cfg = load_config(args.config)
    if args.resolve:
        from flowcurate.models.tiny import resolve_models

        cfg = resolve_models(cfg, log=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps(to_dict(cfg), indent=2))
    return 0


def _demo(args) -> int:
    from flowcurate.cli.demo import run_demo

    run_demo(Path(args.output), n=args.n, seed=args.seed, **({"train_steps": args.train_steps} if args.train_steps else {}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="flowcurate",
        description="SD3-style data curation (captions, SSCD dedup, precomputed latents and text "
                    "encodings) and a compact rectified-flow MM-DiT trainer.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_model_parsers(sub)
    add_dedup_parser(sub)
    # `run` is parsed by Beam's PipelineOptions (main() hands it over before argparse); listed here for help
    sub.add_parser("run", help="curate raw image shards into training shards (Apache Beam); see run --help")
    add_train_parser(sub)
    add_sample_parser(sub)
    add_edit_parser(sub)
    add_memorization_parser(sub)
    add_export_parser(sub)
    add_filters_parser(sub)

    p = sub.add_parser("config", help="print a config (preset name or TOML path) as JSON",
                       epilog="examples:\n  flowcurate config --config sd3\n"
                              "  flowcurate config --config tiny --resolve   # build/resolve tiny:// paths",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd3", help="preset name (sd3, the default; tiny) or path to a TOML file")
    p.add_argument("--resolve", action="store_true", help="resolve tiny:// model locations to paths")
    p.set_defaults(func=_config)

    p = sub.add_parser("demo", help="run the whole journey offline on tiny models (what `make demo` runs)",
                       epilog="example:\n  flowcurate demo --output demo-out/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo-out", help="folder for everything the demo writes")
    p.add_argument("--n", type=int, default=512, help="sample images (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 300: a few minutes)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":  # Beam's PipelineOptions parses run's flags (they pass through)
        from flowcurate.pipeline.cli import main as run_main

        return run_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from flowcurate.formats.config import ConfigError
    from flowcurate.formats.shards import ShardFormatError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"flowcurate: config error: {e}", file=sys.stderr)
        return 2
    except ShardFormatError as e:  # includes flowcurate.trainer.data.DataError
        print(f"flowcurate {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
