"""`flowcurate dedup` / `python -m flowcurate.dedup`: the flags, parsed into a config and a request
for `flowcurate.dedup.command.dedup` (which reads, decides and writes; its docstring has the steps).

Imports stay inside functions: the `flowcurate` umbrella builds this parser for every subcommand, and
`--help` should not wait for torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowcurate.formats.args import ArgumentParser

RAW = argparse.RawDescriptionHelpFormatter

EXAMPLES = """\
examples:
  # an image folder (recursively) with the real SSCD model (downloaded once into the cache)
  flowcurate dedup --input photos/ --output dd/
  # img2dataset / WebDataset tars, offline with the tiny models, on a GPU
  flowcurate dedup --input 'raw/*.tar' --output dd/ --config tiny --device cuda
  # precomputed embeddings (key, embedding list<float32>[, width, height]); a previous run's
  # dd/embeddings.parquet works too: try other thresholds without embedding again
  flowcurate dedup --input dd/embeddings.parquet --output dd-0.75/ --threshold 0.75
  # a float16/float32 .npy (memory-mapped) with one key per line
  flowcurate dedup --input emb.npy --keys keys.txt --output dd/
  # decontaminate against evaluation images' embeddings (or their images) as well
  flowcurate dedup --input 'raw/*.tar' --reference eval/embeddings.parquet --output dd/
  # 100 % recall (all pairs; slower), keep the smaller key instead of the larger image
  flowcurate dedup --input emb.parquet --output dd/ --exact --priority key
  # 10M float16 embeddings on a GPU: k-means in torch there (up to 4M items a GPU searches all pairs
  # by default)
  flowcurate dedup --input emb10m.npy --keys keys.txt --output dd/ --device cuda

outputs (in --output):
  dedup.parquet       one row per input: key, source, status (kept|duplicate|rejected), reason,
                      duplicate_of, similarity, reference_key, cluster, width, height
  embeddings.parquet  key, embedding, width, height (when computed from images)
  summary.json        counts, timings, parameters, removed counts at SD3's thresholds 0.5..0.95
  duplicates.png      largest and borderline groups with their cosines (when inputs are images)

exit status: 0 on success (unreadable images are rejected rows), 2 for unusable input.
"""


def _threshold(text: str) -> float:
    t = float(text)
    if not -1.0 <= t < 1.0:
        raise argparse.ArgumentTypeError(f"cosine threshold must be in [-1, 1), got {text}")
    return t


def _clusters(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"--clusters must be 'auto' or a positive integer, got {text!r}")
    return text


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, max(0, cpus - 1))


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--input", "-i", nargs="+", action="extend", required=True, metavar="SPEC",
                    help="image files, folders (recursive), globs ('**' recursive), .tar shards; or "
                         "embedding files (.parquet, .npy); repeatable")
    io.add_argument("--keys", metavar="PATH", help="keys file for an .npy --input (one key per line)")
    io.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the outputs")
    io.add_argument("--reference", nargs="+", action="extend", metavar="SPEC",
                    help="embeddings (or images) to decontaminate against: inputs with cosine above the "
                         "threshold to any of them are rejected as filtered:reference")
    io.add_argument("--reference-keys", metavar="PATH", help="keys file for an .npy --reference")
    io.add_argument("--skip-bad-embeddings", action="store_true",
                    help="reject zero/NaN/inf rows of embedding files as bad_embedding rows instead of "
                         "stopping with an error")

    d = p.add_argument_group("dedup (override the config's [dedup] section)")
    d.add_argument("--threshold", type=_threshold, metavar="COS",
                   help="cosine above which two images are duplicates (default 0.5, SD3 App. E.2; the SSCD "
                        "authors' 90 %% precision point is 0.75)")
    d.add_argument("--clusters", type=_clusters, metavar="auto|K",
                   help="k-means cells: auto (exact search up to 20k items, or 4M on a GPU, else about "
                        "4 sqrt(N)) or K")
    d.add_argument("--assign", type=_positive, metavar="A",
                   help="recall: nearest cells each item is searched in (default 8)")
    d.add_argument("--assign-margin", type=float, metavar="M",
                   help="recall: use a 2nd..A-th cell only when its centroid cosine is within M of the "
                        "nearest (default 0.1; 2 = always)")
    d.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="search all pairs (100 %% recall, no k-means)")
    d.add_argument("--kmeans-sample", type=_positive, metavar="N",
                   help="items (chosen by key hash) that train the k-means (default 100000)")
    d.add_argument("--kmeans", choices=("auto", "faiss", "torch"),
                   help="k-means implementation: auto (torch on the GPU when --device is one, else FAISS; "
                        "default), faiss or torch")
    d.add_argument("--seed", type=int, help="k-means seed (default 0)")
    d.add_argument("--priority", choices=("pixels", "key"),
                   help="who is kept in a group: the most pixels, then smallest key (default) or the "
                        "smallest key")

    m = p.add_argument_group("model and resources")
    m.add_argument("--config", default="sd3", metavar="NAME|PATH",
                   help="preset (sd3: the released sscd_disc_mixup model, downloaded once; tiny: the "
                        "offline tiny model) or a TOML file (default sd3)")
    m.add_argument("--sscd", metavar="PATH|URL|NAME",
                   help="SSCD TorchScript model: file, URL or release name (overrides [models] sscd; "
                        "loading TorchScript runs its code: use files you trust)")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    m.add_argument("--batch-size", type=_positive, default=64, help="images per SSCD batch (default 64)")
    m.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"image-decoding worker processes (default {_default_workers()}: CPUs - 1, at most 8)")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines")


def add_parser(sub) -> argparse.ArgumentParser:
    """Mount `dedup` on an argparse subparsers object (the `flowcurate` umbrella does this)."""
    p = sub.add_parser("dedup", help="remove SSCD near-duplicates from images or embeddings",
                       description=_DESCRIPTION, epilog=EXAMPLES, formatter_class=RAW)
    add_arguments(p)
    p.set_defaults(func=run, prog=p.prog)
    return p


_DESCRIPTION = ("SSCD near-duplicate removal as in SD3 App. E.2: embed images with an SSCD model (or "
                "read precomputed embeddings), cluster with k-means, search exactly inside the cells, "
                "keep one image per group by SD3's Algorithm 1, and write one decision row per input.")


def build_parser(prog: str = "python -m flowcurate.dedup") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=_DESCRIPTION, epilog=EXAMPLES, formatter_class=RAW)
    add_arguments(p)
    p.set_defaults(func=run, prog=prog)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run and report; unusable input -> exit 2 with one line on stderr."""
    from flowcurate.dedup.command import dedup
    from flowcurate.dedup.inputs import InputError, UsageError
    from flowcurate.formats.config import ConfigError, resolve_device

    prog = getattr(args, "prog", "flowcurate dedup")
    try:
        cfg, request = _config(args), _request(args, prog)
        summary = dedup(cfg, request, resolve_device(args.device))
    except (InputError, ConfigError, UsageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    c = summary["counts"]
    print(f"{prog}: {c['inputs']} inputs: {c['kept']} kept, {c['duplicate']} duplicates, "
          f"{c['rejected']} rejected -> {Path(args.output) / 'dedup.parquet'}")
    return 0


def _config(args):
    """The config (--config) with the flags applied and checked."""
    from flowcurate.dedup.inputs import UsageError
    from flowcurate.formats.config import load_config, override

    cfg = load_config(args.config)
    cfg = override(cfg, "dedup", threshold=args.threshold, clusters=args.clusters, assign=args.assign,
                   assign_margin=args.assign_margin, exact=args.exact, kmeans_sample=args.kmeans_sample,
                   kmeans=args.kmeans, seed=args.seed, priority=args.priority)
    cfg = override(cfg, "models", sscd=args.sscd)
    clusters = cfg.dedup.clusters
    if clusters != "auto" and not (clusters.isdigit() and int(clusters) >= 1):
        raise UsageError(f"[dedup] clusters must be 'auto' or a positive integer, got {clusters!r}")
    if cfg.dedup.kmeans not in ("auto", "faiss", "torch"):
        raise UsageError(f"[dedup] kmeans must be 'auto', 'faiss' or 'torch', got {cfg.dedup.kmeans!r}")
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.reference_keys and not args.reference:
        raise UsageError("--reference-keys needs --reference")
    return cfg


def _request(args, prog: str):
    from flowcurate.dedup.command import Request

    return Request(
        inputs=tuple(args.input), output=Path(args.output), keys=args.keys, reference=tuple(args.reference or ()),
        reference_keys=args.reference_keys, skip_bad_embeddings=args.skip_bad_embeddings,
        batch_size=args.batch_size, workers=_default_workers() if args.workers is None else args.workers,
        quiet=args.quiet, prog=prog)
