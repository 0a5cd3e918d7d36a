"""`flowcurate dedup` / `python -m flowcurate.dedup`: SSCD near-duplicate removal without Beam.

    inputs   -> images, folders, globs, WebDataset tars: listed, decoded, SSCD-embedded
                or precomputed embeddings (DESIGN.md's Parquet schema, or .npy + --keys)
    --reference (optional): embeddings or images to decontaminate against; inputs above the threshold
                to any of them are rejected as filtered:reference and take no part in the dedup
    dedup    -> flowcurate.dedup.core.find_duplicates (k-means cells, exact in-cell search, SD3 Algorithm 1)
    outputs  -> flowcurate.dedup.report: dedup.parquet, embeddings.parquet (from images), summary.json,
                duplicates.png

Unusable input (nothing to read, mixed dimensions, NaN/zero embeddings in a file, a missing SSCD
model) stops with exit status 2 and a one-line message; a bad image is a rejected row and the run
goes on. NaN/zero rows in an embeddings file are an error by default, because such a file is more
likely broken than partly bad; `--skip-bad-embeddings` turns them into `bad_embedding` rows instead
(DESIGN.md). Descriptors the model computes from images are never an error: a NaN one is a row.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAW = argparse.RawDescriptionHelpFormatter
EMBEDDING_SUFFIXES = (".parquet", ".npy")
REFERENCE_REASON = "filtered:reference"
SUMMARY_VERSION = 1

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
  # 10M float16 embeddings on a GPU: k-means in torch there, the search ~2.5 min on an H100 (up to 4M
  # items a GPU searches all pairs by default)
  flowcurate dedup --input emb10m.npy --keys keys.txt --output dd/ --device cuda

outputs (in --output):
  dedup.parquet       one row per input: key, source, status (kept|duplicate|rejected), reason,
                      duplicate_of, similarity, reference_key, cluster, width, height
  embeddings.parquet  key, embedding, width, height (when computed from images)
  summary.json        counts, timings, parameters, removed counts at SD3's thresholds 0.5..0.95
  duplicates.png      largest and borderline groups with their cosines (when inputs are images)

exit status: 0 on success (unreadable images are rejected rows), 2 for unusable input.
"""


class UsageError(ValueError):
    """A flag combination that cannot work (exit 2, one line)."""


# ----------------------------------------------------------------------------- parser


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
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, epilog=EXAMPLES, formatter_class=RAW)
    add_arguments(p)
    p.set_defaults(func=run, prog=prog)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run and report; unusable input -> exit 2 with one line on stderr."""
    from flowcurate.dedup.inputs import InputError
    from flowcurate.formats.config import ConfigError

    prog = getattr(args, "prog", "flowcurate dedup")
    try:
        summary = dedup(args)
    except (InputError, ConfigError, UsageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    c = summary["counts"]
    print(f"{prog}: {c['inputs']} inputs: {c['kept']} kept, {c['duplicate']} duplicates, "
          f"{c['rejected']} rejected -> {Path(args.output) / 'dedup.parquet'}")
    return 0


# ----------------------------------------------------------------------------- inputs


@dataclass
class Loaded:
    """One side (--input or --reference) after reading or embedding."""

    mode: str  # "images" | "embeddings"
    embedded: object  # flowcurate.dedup.inputs.Embedded
    files: int
    items: dict = field(default_factory=dict)  # images: key -> ImageItem (to re-read for the sheet)


class _Context:
    """What both sides share: config, log, device, and the SSCD model, loaded at most once."""

    def __init__(self, args, cfg, log):
        from flowcurate.formats.config import resolve_device

        self.args, self.cfg, self.log = args, cfg, log
        self.device = resolve_device(args.device)
        self.model = None
        self.sscd: dict | None = None
        self.timings: dict[str, float] = {}

    def load_model(self):
        if self.model is not None:
            return self.model
        from flowcurate.dedup.inputs import InputError
        from flowcurate.formats.config import TINY_SCHEME, override
        from flowcurate.models.sscd import load_sscd, resolve_sscd

        t0 = time.perf_counter()
        location = self.cfg.models.sscd
        self.log(f"loading SSCD model {location}")
        try:
            if location.startswith(TINY_SCHEME):  # only the SSCD role is needed here
                from flowcurate.models.tiny import resolve_tiny

                path = Path(resolve_tiny(location, log=self.log))
            else:
                path = resolve_sscd(location)
            self.model = load_sscd(path, self.device)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            raise InputError(f"cannot load the SSCD model {location!r}: {str(e).splitlines()[0]}") from None
        path = Path(path).resolve()
        self.cfg = override(self.cfg, "models", sscd=str(path))
        self.sscd = {"location": location, "path": str(path), "sha256": _sha256(path),
                     "preprocess": self.preprocess().record()}
        self.timings["load_model"] = time.perf_counter() - t0
        return self.model

    def preprocess(self):
        from flowcurate.models.sscd import SSCDPreprocess

        d = self.cfg.dedup
        return SSCDPreprocess(size=d.sscd_size, mean=tuple(d.mean), std=tuple(d.std))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _classify(specs: list[str], what: str, exclude: set[Path]) -> tuple[str, list[Path]]:
    """-> ("images", image and tar files) or ("embeddings", .parquet/.npy files). Next to tars,
    img2dataset's .parquet/.json metadata found by a folder or glob is ignored; embedding files
    named directly together with images are an error."""
    from flowcurate.dedup.inputs import InputError, expand
    from flowcurate.formats.tars import IMAGE_EXTS

    # never read our own decisions or contact sheet back (--output inside an --input folder)
    files = [f for f in expand(specs) if f.resolve() not in exclude]
    images = [f for f in files if f.suffix.lower().lstrip(".") in IMAGE_EXTS or f.suffix.lower() == ".tar"]
    embeddings = [f for f in files if f.suffix.lower() in EMBEDDING_SUFFIXES]
    if images:
        named = {Path(s).expanduser() for s in specs if Path(s).expanduser().is_file()}
        explicit = [f for f in embeddings if f in named]
        if explicit:
            raise InputError(f"{what} mixes images/tars with the embeddings file {explicit[0]}; "
                             "give one kind per run")
        return "images", images
    if embeddings:
        return "embeddings", embeddings
    raise InputError(f"{what} {' '.join(specs)}: no images, .tar shards or embedding files (.parquet, .npy)")


def read_embedding_files(files: list[Path], keys_path: str | None, what: str):
    """Embedding files -> one `Embedded` (a single .npy stays memory-mapped). File-level problems
    (unreadable, mixed dimensions, repeated keys, empty) raise InputError."""
    import numpy as np
    import pyarrow as pa

    from flowcurate.dedup.inputs import Embedded, InputError, read_embeddings

    npys = [f for f in files if f.suffix.lower() == ".npy"]
    if len(npys) > 1:
        raise InputError(f"{what}: one .npy file per run (with its keys file); got {len(npys)}")
    if keys_path and not npys:
        raise UsageError(f"{what} names no .npy file; a keys file is only for .npy embeddings")
    parts = []
    for f in files:
        try:
            parts.append(read_embeddings(f, keys_path if f.suffix.lower() == ".npy" else None))
        except InputError:
            raise
        except (ValueError, OSError, pa.ArrowException) as e:
            raise InputError(f"{f}: cannot read embeddings ({str(e).splitlines()[0]})") from None
    if len(parts) == 1:
        return parts[0]
    dims = sorted({p.embeddings.shape[1] for p in parts})
    if len(dims) > 1:
        raise InputError(f"{what}: embedding files have different dimensions {dims}")
    keys = [k for p in parts for k in p.keys]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise InputError(f"{what}: key {dup!r} appears in more than one embeddings file")
    dtype = np.float16 if all(p.embeddings.dtype == np.float16 for p in parts) else np.float32
    return Embedded(keys, [s for p in parts for s in p.sources],
                    np.concatenate([np.asarray(p.embeddings, dtype=dtype) for p in parts]),
                    np.concatenate([p.widths for p in parts]), np.concatenate([p.heights for p in parts]))


def _load(specs: list[str], keys_path: str | None, what: str, ctx: _Context, exclude: set[Path]) -> Loaded:
    import numpy as np
    from tqdm import tqdm

    from flowcurate.dedup.inputs import embed_images, list_images

    mode, files = _classify(specs, what, exclude)
    if mode == "embeddings":
        t0 = time.perf_counter()
        emb = read_embedding_files(files, keys_path, what)
        ctx.timings[f"read_{what.strip('-')}"] = time.perf_counter() - t0
        return Loaded(mode, emb, len(files))
    if keys_path:
        raise UsageError(f"{what} names images; a keys file is only for .npy embeddings")
    t0 = time.perf_counter()
    ctx.log(f"{what}: listing {len(files)} files")
    with tqdm(total=len(files), desc=f"list {what.strip('-')}", unit="file", file=sys.stderr,
              disable=ctx.args.quiet, dynamic_ncols=True) as bar:
        listing = list_images(files, progress=bar.update)
    ctx.timings[f"list_{what.strip('-')}"] = time.perf_counter() - t0
    ctx.log(f"{what}: {len(listing.items)} images, {len(listing.rejected)} rejected while listing")
    items = {it.key: it for it in listing.items}
    if listing.items:
        model = ctx.load_model()
        a = ctx.args
        t0 = time.perf_counter()
        with tqdm(total=len(listing.items), desc=f"embed {what.strip('-')}", unit="img", file=sys.stderr,
                  disable=a.quiet, dynamic_ncols=True) as bar:
            emb = embed_images(listing, model, ctx.preprocess(), batch_size=a.batch_size,
                               workers=_default_workers() if a.workers is None else a.workers,
                               device=ctx.device, max_pixels=ctx.cfg.pipeline.max_pixels,
                               progress=bar.update)
        ctx.timings[f"embed_{what.strip('-')}"] = time.perf_counter() - t0
    else:  # nothing decodable: every item is already a rejection
        emb = embed_images(listing, None, ctx.preprocess())
    if emb.embeddings.shape[1] == 0:
        emb.embeddings = np.zeros((0, 1), np.float32)
    return Loaded(mode, emb, len(files), items)


def check_rows(embeddings, keys: list[str], what: str, skip: bool):
    """(N, D) -> (N,) bool valid rows. Zero/NaN/inf rows are an InputError unless `skip`."""
    from flowcurate.dedup.core import valid_rows
    from flowcurate.dedup.inputs import InputError

    valid = valid_rows(embeddings)
    bad = [keys[i] for i in range(len(keys)) if not valid[i]]
    if bad and not skip:
        first = ", ".join(repr(k) for k in bad[:3])
        raise InputError(f"{what}: {len(bad)} embedding(s) are zero, NaN or infinite (first: {first}); fix "
                         "the file, or pass --skip-bad-embeddings to reject them as bad_embedding rows")
    return valid


# ----------------------------------------------------------------------------- reference


def match_reference(embeddings, rows, reference, ref_rows, ref_keys, threshold: float, *,
                    block_rows: int = 2048, device: str = "cpu", progress=None):
    """Each input row's most similar reference row above the threshold.

    embeddings: (N, D) raw inputs, rows: input rows to check; reference: (R, D) raw, ref_rows: its
    valid rows; ref_keys: (R,) -> best (N,) int64 reference row (-1: none above), cos (N,) float32.
    Candidates come from matrix products, membership and the winner from the exact float32 cosine
    (`flowcurate.dedup.engine.search_block_pair`); ties go to the smaller reference key, so the answer does not
    depend on block sizes or file order.
    """
    import numpy as np

    from flowcurate.dedup.engine import make_engine, search_block_pair
    from flowcurate.dedup.numerics import unit_rows

    n = len(embeddings)
    best = np.full(n, -1, dtype=np.int64)
    best_cos = np.full(n, -np.inf, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    ref_rows = np.asarray(ref_rows, dtype=np.int64)
    if len(rows) == 0 or len(ref_rows) == 0:
        return best, np.where(best >= 0, best_cos, np.nan).astype(np.float32)
    key_rank = np.empty(len(ref_keys), dtype=np.int64)
    key_rank[np.argsort(np.asarray(ref_keys, dtype=object), kind="stable")] = np.arange(len(ref_keys))
    engine = make_engine(device)
    ref_blocks = [ref_rows[s:s + block_rows] for s in range(0, len(ref_rows), block_rows)]
    cached = len(ref_rows) * reference.shape[1] * 4 <= 1 << 29  # keep unit reference rows if <= 512 MiB
    ref_units = [unit_rows(reference[b]) for b in ref_blocks] if cached else None
    starts = range(0, len(rows), block_rows)
    for done, s in enumerate(starts, 1):
        ia_rows = rows[s:s + block_rows]
        ua = unit_rows(embeddings[ia_rows])
        for b, rb in enumerate(ref_blocks):
            ub = ref_units[b] if cached else unit_rows(reference[rb])
            ia, ib, cos = search_block_pair(ua, ub, threshold, engine)
            if len(ia) == 0:
                continue
            gi, gj = ia_rows[ia], rb[ib]
            # merge with the current best: per input row, highest cosine, then smallest reference key
            gi = np.concatenate([gi, gi])
            gj = np.concatenate([gj, np.where(best[ia_rows[ia]] >= 0, best[ia_rows[ia]], gj)])
            cos = np.concatenate([cos, np.where(best[ia_rows[ia]] >= 0, best_cos[ia_rows[ia]], cos)])
            order = np.lexsort((key_rank[gj], -cos, gi))
            gi, gj, cos = gi[order], gj[order], cos[order]
            first = np.ones(len(gi), dtype=bool)
            first[1:] = gi[1:] != gi[:-1]
            best[gi[first]], best_cos[gi[first]] = gj[first], cos[first]
        if progress:
            progress(done, len(starts))
    return best, np.where(best >= 0, best_cos, np.nan).astype(np.float32)


# ----------------------------------------------------------------------------- the command


class _Bars:
    """flowcurate.dedup.core's progress(stage, done, total) as one tqdm bar per stage."""

    def __init__(self, quiet: bool):
        self.quiet, self.bars = quiet, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="task", file=sys.stderr,
                                          disable=self.quiet, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _config(args):
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


def dedup(args: argparse.Namespace) -> dict:
    """The whole command: read or embed, decontaminate, dedup, write. Returns the summary it wrote."""
    import numpy as np

    from flowcurate.dedup.core import find_duplicates
    from flowcurate.dedup.inputs import InputError
    from flowcurate.dedup.report import write_rows, write_summary

    t_start = time.perf_counter()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    ctx = _Context(args, _config(args), log)
    dcfg = ctx.cfg.dedup
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} exists and is not a folder")

    exclude = {(out / name).resolve() for name in ("dedup.parquet", "duplicates.png")}
    inp = _load(args.input, args.keys, "--input", ctx, exclude)
    emb = inp.embedded
    if not emb.keys and not emb.rejected:
        raise InputError(f"--input {' '.join(args.input)}: no items")
    # descriptors the model computed are rows, never an error (DESIGN.md: rejected as bad_embedding)
    valid = check_rows(emb.embeddings, emb.keys, "--input",
                       skip=args.skip_bad_embeddings or inp.mode == "images")
    if inp.mode == "images" and not valid.all():
        log(f"warning: the SSCD model gave {int((~valid).sum())} zero/NaN descriptors (bad_embedding rows)")

    ref = _decontaminate(args, ctx, emb, valid, exclude) if args.reference else None
    filtered = ref["best"] >= 0 if ref else np.zeros(len(emb.keys), dtype=bool)

    # dedup among the rest (bad rows go in too: the core turns them into bad_embedding rows)
    idx = np.flatnonzero(~filtered)
    w, h = np.asarray(emb.widths, dtype=np.int64), np.asarray(emb.heights, dtype=np.int64)
    bars = _Bars(args.quiet)
    result = find_duplicates(
        emb.embeddings if len(idx) == len(emb.keys) else emb.embeddings[idx], [emb.keys[i] for i in idx],
        dcfg, pixels=np.where((w > 0) & (h > 0), w * h, 0)[idx], device=ctx.device, progress=bars)
    bars.close()
    ctx.timings["dedup"] = result.stats.get("t_total", 0.0)

    t0 = time.perf_counter()
    rows = _decision_rows(emb, idx, result, ref)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "dedup.parquet", rows)
    outputs = _write_extras(out, ctx, inp, valid, rows)
    ctx.timings["report"] = time.perf_counter() - t0
    summary = _summary(args, ctx, inp, rows, result, ref, outputs, t_start)
    write_summary(out / "summary.json", summary)
    return summary


def _decontaminate(args, ctx: _Context, emb, valid, exclude: set[Path]) -> dict:
    """--reference: each valid input's most similar reference item above the threshold."""
    import numpy as np

    from flowcurate.dedup.core import SD3_THRESHOLDS
    from flowcurate.dedup.inputs import InputError
    from flowcurate.dedup.report import removed_table

    loaded = _load(args.reference, args.reference_keys, "--reference", ctx, exclude)
    ref = loaded.embedded
    if not ref.keys:
        raise InputError("--reference: no usable items")
    if emb.keys and ref.embeddings.shape[1] != emb.embeddings.shape[1]:
        raise InputError(f"--reference embeddings are {ref.embeddings.shape[1]}-d but --input's are "
                         f"{emb.embeddings.shape[1]}-d (same SSCD model and preprocessing needed)")
    ref_valid = check_rows(ref.embeddings, ref.keys, "--reference",
                           skip=args.skip_bad_embeddings or loaded.mode == "images")
    t0 = time.perf_counter()
    bars = _Bars(args.quiet)
    threshold = ctx.cfg.dedup.threshold
    best, cos = match_reference(
        emb.embeddings, np.flatnonzero(valid), ref.embeddings, np.flatnonzero(ref_valid), ref.keys,
        threshold, block_rows=ctx.cfg.dedup.block_rows, device=ctx.device,
        progress=lambda done, total: bars("reference", done, total))
    bars.close()
    ctx.timings["reference"] = time.perf_counter() - t0
    hit = best >= 0
    ctx.log(f"--reference: {int(hit.sum())} inputs match one of {len(ref.keys)} reference items")
    return {
        "best": best, "cos": cos, "keys": ref.keys,
        "info": {
            "specs": list(args.reference), "mode": loaded.mode, "items": len(ref.keys),
            "usable": int(ref_valid.sum()), "rejected_while_reading": len(ref.rejected),
            "matched_inputs": int(hit.sum()),
            # inputs filtered at each threshold (null: below --threshold, not searched)
            "removed_by_threshold": removed_table(
                {t: int((cos[hit] > np.float32(t)).sum()) for t in SD3_THRESHOLDS
                 if np.float32(t) >= np.float32(threshold)}, SD3_THRESHOLDS),
        },
    }


def _decision_rows(emb, idx, result, ref: dict | None) -> list:
    """Listing/decoding rejections + reference rejections + the core's decisions for rows `idx`."""
    from flowcurate.dedup.report import Row, report_similarity

    def size(i):
        w, h = int(emb.widths[i]), int(emb.heights[i])
        return {"width": w if w > 0 else None, "height": h if h > 0 else None}

    rows = [Row(k, src, "rejected", reason) for k, src, reason in emb.rejected]
    if ref is not None:
        for i in (ref["best"] >= 0).nonzero()[0].tolist():
            rows.append(Row(emb.keys[i], emb.sources[i], "rejected", REFERENCE_REASON,
                            similarity=report_similarity(ref["cos"][i]),
                            reference_key=ref["keys"][ref["best"][i]], **size(i)))
    for i, r in zip(idx.tolist(), result.rows()):
        sim = None if r["similarity"] is None else report_similarity(r["similarity"])
        rows.append(Row(emb.keys[i], emb.sources[i], r["status"], r["reason"], r["duplicate_of"], sim,
                        cluster=r["cluster"], **size(i)))
    _check_invariants(rows, len(emb.keys) + len(emb.rejected))
    return rows


def _write_extras(out: Path, ctx: _Context, inp: Loaded, valid, rows) -> dict:
    """embeddings.parquet and duplicates.png, when the inputs were images."""
    import numpy as np

    from flowcurate.dedup.inputs import write_embeddings
    from flowcurate.dedup.report import contact_sheet
    from flowcurate.formats.images import decode_image
    from flowcurate.formats.tars import Member, read_member

    outputs: dict = {"decisions": "dedup.parquet", "embeddings": None, "contact_sheet": None}
    if inp.mode != "images":
        outputs["contact_sheet_skipped"] = "inputs are embeddings: no images to show"
        return outputs
    emb = inp.embedded
    good = np.flatnonzero(valid)
    write_embeddings(out / "embeddings.parquet", [emb.keys[i] for i in good], emb.embeddings[good],
                     emb.widths[good], emb.heights[good])
    outputs["embeddings"] = "embeddings.parquet"

    def read_image(key):
        it = inp.items.get(key)
        if it is None:
            return None
        try:
            with open(it.path, "rb") as fh:  # a tar member by its listed offset, never by its name
                data = read_member(fh, Member("", it.offset, it.size)) if it.offset >= 0 else fh.read()
            return decode_image(data, ctx.cfg.pipeline.max_pixels).image
        except Exception:  # the sheet shows a placeholder; the decision rows are already written
            return None

    outputs["contact_sheet_shows"] = contact_sheet(out / "duplicates.png", rows, read_image,
                                                   ctx.cfg.dedup.threshold)
    outputs["contact_sheet"] = "duplicates.png"
    return outputs


def _summary(args, ctx: _Context, inp: Loaded, rows, result, ref, outputs, t_start: float) -> dict:
    import numpy as np

    from flowcurate.dedup.core import SD3_THRESHOLDS
    from flowcurate.dedup.report import group_summary, removed_table
    from flowcurate.formats.config import to_dict
    from flowcurate.formats.manifest import BAD_EMBEDDING
    emb = inp.embedded
    counts = {"inputs": len(rows), "kept": 0, "duplicate": 0, "rejected": 0}
    reasons: dict[str, int] = {}
    for r in rows:
        counts[r.status] += 1
        if r.reason:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    searched = [t for t in SD3_THRESHOLDS if np.float32(t) >= np.float32(ctx.cfg.dedup.threshold)]
    timings = {k: round(v, 3) for k, v in ctx.timings.items()}
    timings.update({k[2:]: round(v, 3) for k, v in result.stats.items() if k.startswith("t_") and k != "t_total"})
    timings["total"] = round(time.perf_counter() - t_start, 3)
    return {
        "format_version": SUMMARY_VERSION,
        "command": getattr(args, "prog", "flowcurate dedup"),
        "inputs": {"specs": list(args.input), "mode": inp.mode, "files": inp.files, "items": len(rows),
                   "vectors": len(emb.keys), "dim": int(emb.embeddings.shape[1]) if emb.keys else None,
                   "dtype": str(emb.embeddings.dtype)},
        "counts": {**counts, "rejected_by_reason": dict(sorted(reasons.items())),
                   "bad_embedding": reasons.get(BAD_EMBEDDING, 0)},
        "groups": group_summary(rows),
        # SD3 Fig. 16b: near-duplicates removed at each threshold, from this one search (null: below
        # --threshold, where pairs were not searched); reference matches are counted under "reference"
        "removed_by_threshold": removed_table(result.removed_counts(searched), SD3_THRESHOLDS),
        "reference": ref["info"] if ref else None,
        "parameters": {
            **to_dict(ctx.cfg)["dedup"], "device": ctx.device, "batch_size": args.batch_size,
            "workers": _default_workers() if args.workers is None else args.workers,
            "skip_bad_embeddings": bool(args.skip_bad_embeddings), "similarity": "cosine, strict >",
        },
        "sscd": ctx.sscd,  # null when no image was embedded
        "search": {k: v for k, v in result.stats.items() if not k.startswith("t_")},
        "timings_s": timings,
        "outputs": outputs,
        "config": to_dict(ctx.cfg),
        "versions": _versions(),
    }


def _check_invariants(rows, expected: int) -> None:
    """DESIGN.md: inputs = kept + duplicate + rejected; every duplicate_of names a kept key."""
    keys = [r.key for r in rows]
    if len(keys) != expected or len(set(keys)) != expected:
        raise RuntimeError(f"internal error: {len(set(keys))} unique rows for {expected} inputs")
    kept = {r.key for r in rows if r.status == "kept"}
    bad = [r.key for r in rows if r.status == "duplicate" and r.duplicate_of not in kept]
    if bad:
        raise RuntimeError(f"internal error: duplicate rows {bad[:3]} do not name a kept key")


def _versions() -> dict:
    import numpy as np
    import torch

    out = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["flowcurate"] = version("flowcurate")
        out["faiss-cpu"] = version("faiss-cpu")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        pass
    return out
