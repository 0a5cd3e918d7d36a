"""The `flowcurate dedup` command, without its parser: read or embed, decontaminate, dedup, write.

    request + config -> classify both sides (images or embedding files); `tiny://` resolved once here
    inputs          -> listed, decoded and SSCD-embedded (`flowcurate.dedup.inputs`), or read from files
    --reference     -> inputs above the threshold to any reference item: `filtered:reference` rows
                       (`flowcurate.dedup.reference`), no part in the dedup
    dedup           -> `flowcurate.dedup.core.find_duplicates` on the rest, with the `[dedup]` section
    outputs         -> `flowcurate.dedup.report`: dedup.parquet, embeddings.parquet (from images),
                       summary.json, duplicates.png

Unusable input raises `InputError` / `UsageError` (the CLI's exit status 2). A bad image is a rejected
row and the run goes on. NaN/zero rows in an embeddings file are an error unless
`skip_bad_embeddings`, because such a file is more likely broken than partly bad; descriptors the
model computes from images are never an error: a NaN one is a `bad_embedding` row.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowcurate.dedup.core import SD3_THRESHOLDS, DedupResult, find_duplicates
from flowcurate.dedup.files import open_binary
from flowcurate.dedup.inputs import (
    Embedded,
    InputError,
    UsageError,
    check_rows,
    classify,
    embed_images,
    list_images,
    read_embedding_files,
)
from flowcurate.dedup.reference import REFERENCE_REASON, match_reference
from flowcurate.dedup.report import (
    Row,
    contact_sheet,
    group_summary,
    removed_table,
    report_similarity,
    write_rows,
    write_summary,
)
from flowcurate.formats.config import Config, override, to_dict
from flowcurate.formats.manifest import BAD_EMBEDDING

SUMMARY_VERSION = 1


@dataclass(frozen=True)
class Request:
    """What to read and where to write; the `[dedup]` parameters come from the config."""

    inputs: tuple[str, ...]
    output: Path
    keys: str | None = None  # keys file of an .npy input
    reference: tuple[str, ...] = ()
    reference_keys: str | None = None
    skip_bad_embeddings: bool = False
    batch_size: int = 64  # images per SSCD batch
    workers: int = 0  # image-decoding worker processes
    quiet: bool = False
    prog: str = "flowcurate dedup"


@dataclass(frozen=True)
class Side:
    """One side (--input or --reference) after reading or embedding."""

    mode: str  # "images" | "embeddings"
    embedded: Embedded
    files: int
    items: dict = field(default_factory=dict)  # images: key -> ImageItem (to re-read for the sheet)
    timings: dict = field(default_factory=dict)  # seconds: read_* | list_*, embed_*


@dataclass(frozen=True)
class Model:
    """The SSCD model, loaded once for both sides, and what the summary records about it."""

    net: object  # torch.jit.ScriptModule
    preprocess: object  # flowcurate.models.sscd.SSCDPreprocess
    record: dict  # location, path, sha256, preprocess
    seconds: float


@dataclass(frozen=True)
class Run:
    """What the steps of one command share, fixed at its entry (nothing rewrites it later)."""

    cfg: Config  # flags applied, the SSCD location resolved from tiny:// when images are read
    device: str  # resolved: "cpu", "cuda", ...
    request: Request
    location: str  # the SSCD location as named, for log lines and the summary
    log: Callable[[str], None]


class Bars:
    """progress(stage, done, total) as one tqdm bar per stage."""

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


def _preprocess(cfg: Config):
    from flowcurate.models.sscd import SSCDPreprocess

    d = cfg.dedup
    return SSCDPreprocess(size=d.sscd_size, mean=tuple(d.mean), std=tuple(d.std))


def load_model(run: Run) -> Model:
    """run.cfg.models.sscd (a path after `resolve_models`, or a release name / URL, downloaded once)
    -> the model on run.device."""
    from flowcurate.models.sscd import file_sha256, load_sscd, resolve_sscd

    t0 = time.perf_counter()
    run.log(f"loading SSCD model {run.location}")
    try:
        path = resolve_sscd(run.cfg.models.sscd, run.cfg.models.sscd_sha256)
        net = load_sscd(path, run.device)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        raise InputError(f"cannot load the SSCD model {run.location!r}: {str(e).splitlines()[0]}") from None
    path = Path(path).resolve()
    pre = _preprocess(run.cfg)
    record = {"location": run.location, "path": str(path), "sha256": file_sha256(path), "preprocess": pre.record()}
    return Model(net, pre, record, time.perf_counter() - t0)


def read_side(run: Run, kind: tuple[str, list[Path]], keys_path: str | None, what: str,
              model: Model | None) -> tuple[Side, Model | None]:
    """Read embedding files, or list and embed images (loading the model at the first image; the
    model comes back for the other side). kind: `classify`'s (mode, files)."""
    from tqdm import tqdm

    (mode, files), cfg, request, log = kind, run.cfg, run.request, run.log
    name = what.strip("-")
    if mode == "embeddings":
        t0 = time.perf_counter()
        emb = read_embedding_files(files, keys_path, what)
        return Side(mode, emb, len(files), timings={f"read_{name}": time.perf_counter() - t0}), model
    if keys_path:
        raise UsageError(f"{what} names images; a keys file is only for .npy embeddings")
    timings = {}
    t0 = time.perf_counter()
    log(f"{what}: listing {len(files)} files")
    with tqdm(total=len(files), desc=f"list {name}", unit="file", file=sys.stderr,
              disable=request.quiet, dynamic_ncols=True) as bar:
        listing = list_images(files, progress=bar.update)
    timings[f"list_{name}"] = time.perf_counter() - t0
    log(f"{what}: {len(listing.items)} images, {len(listing.rejected)} rejected while listing")
    if listing.items:
        if model is None:
            model = load_model(run)
            timings["load_model"] = model.seconds
        t0 = time.perf_counter()
        with tqdm(total=len(listing.items), desc=f"embed {name}", unit="img", file=sys.stderr,
                  disable=request.quiet, dynamic_ncols=True) as bar:
            emb = embed_images(listing, model.net, model.preprocess, batch_size=request.batch_size,
                               workers=request.workers,
                               device=run.device, max_pixels=cfg.pipeline.max_pixels, progress=bar.update)
        timings[f"embed_{name}"] = time.perf_counter() - t0
    else:  # nothing decodable: every item is already a rejection
        emb = embed_images(listing, None, _preprocess(cfg))
    if emb.embeddings.shape[1] == 0:
        emb.embeddings = np.zeros((0, 1), np.float32)
    return Side(mode, emb, len(files), {it.key: it for it in listing.items}, timings), model


def dedup(cfg: Config, request: Request, device: str) -> dict:
    """The whole command. cfg: the resolved config (flags applied); device: resolved ("cpu", "cuda").
    Returns the summary it wrote."""
    from flowcurate.models.tiny import resolve_models

    t_start = time.perf_counter()
    log = (lambda msg: None) if request.quiet else (lambda msg: print(msg, file=sys.stderr))
    out = Path(request.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} exists and is not a folder")
    exclude = {(out / name).resolve() for name in ("dedup.parquet", "duplicates.png")}
    kinds = {"--input": classify(request.inputs, "--input", exclude)}
    if request.reference:
        kinds["--reference"] = classify(request.reference, "--reference", exclude)
    location = cfg.models.sscd
    if any(mode == "images" for mode, _ in kinds.values()):  # the one model this command needs
        try:
            cfg = resolve_models(cfg, roles=("sscd",), log=log)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            raise InputError(f"cannot load the SSCD model {location!r}: {str(e).splitlines()[0]}") from None
    run = Run(cfg, device, request, location, log)

    inp, model = read_side(run, kinds["--input"], request.keys, "--input", None)
    emb = inp.embedded
    if not emb.keys and not emb.rejected:
        raise InputError(f"--input {' '.join(request.inputs)}: no items")
    valid = check_rows(emb.embeddings, emb.keys, "--input",
                       skip=request.skip_bad_embeddings or inp.mode == "images")
    if inp.mode == "images" and not valid.all():
        log(f"warning: the SSCD model gave {int((~valid).sum())} zero/NaN descriptors (bad_embedding rows)")
    timings = dict(inp.timings)

    ref = None
    if request.reference:
        side, model = read_side(run, kinds["--reference"], request.reference_keys, "--reference", model)
        timings.update(side.timings)
        ref = _decontaminate(run, side, emb, valid)
        timings["reference"] = ref["seconds"]
    filtered = ref["best"] >= 0 if ref else np.zeros(len(emb.keys), dtype=bool)

    # dedup among the rest (bad rows go in too: the core turns them into bad_embedding rows)
    idx = np.flatnonzero(~filtered)
    w, h = np.asarray(emb.widths, dtype=np.int64), np.asarray(emb.heights, dtype=np.int64)
    bars = Bars(request.quiet)
    result = find_duplicates(
        emb.embeddings if len(idx) == len(emb.keys) else emb.embeddings[idx], [emb.keys[i] for i in idx],
        cfg.dedup, pixels=np.where((w > 0) & (h > 0), w * h, 0)[idx], device=device, progress=bars)
    bars.close()
    timings["dedup"] = result.stats.get("t_total", 0.0)

    t0 = time.perf_counter()
    rows = _decision_rows(emb, idx, result, ref)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "dedup.parquet", rows)
    outputs = _write_extras(out, cfg, inp, valid, rows)
    timings["report"] = time.perf_counter() - t0
    # the config the run used, with the SSCD location it loaded (a path) when it embedded images
    ran = cfg if model is None else override(cfg, "models", sscd=model.record["path"])
    summary = _summary(ran, request, device, inp, rows, result, ref, outputs, timings,
                       model.record if model else None, t_start)
    write_summary(out / "summary.json", summary)
    return summary


def _decontaminate(run: Run, side: Side, emb: Embedded, valid: np.ndarray) -> dict:
    """--reference: each valid input's most similar reference item above the threshold."""
    cfg, request = run.cfg, run.request
    ref = side.embedded
    if not ref.keys:
        raise InputError("--reference: no usable items")
    if emb.keys and ref.embeddings.shape[1] != emb.embeddings.shape[1]:
        raise InputError(f"--reference embeddings are {ref.embeddings.shape[1]}-d but --input's are "
                         f"{emb.embeddings.shape[1]}-d (same SSCD model and preprocessing needed)")
    ref_valid = check_rows(ref.embeddings, ref.keys, "--reference",
                           skip=request.skip_bad_embeddings or side.mode == "images")
    t0 = time.perf_counter()
    bars = Bars(request.quiet)
    threshold = cfg.dedup.threshold
    best, cos = match_reference(
        emb.embeddings, np.flatnonzero(valid), ref.embeddings, np.flatnonzero(ref_valid), ref.keys,
        cfg.dedup, device=run.device, progress=lambda done, total: bars("reference", done, total))
    bars.close()
    seconds = time.perf_counter() - t0
    hit = best >= 0
    run.log(f"--reference: {int(hit.sum())} inputs match one of {len(ref.keys)} reference items")
    return {
        "best": best, "cos": cos, "keys": ref.keys, "seconds": seconds,
        "info": {
            "specs": list(request.reference), "mode": side.mode, "items": len(ref.keys),
            "usable": int(ref_valid.sum()), "rejected_while_reading": len(ref.rejected),
            "matched_inputs": int(hit.sum()),
            # inputs filtered at each threshold (null: below --threshold, not searched)
            "removed_by_threshold": removed_table(
                {t: int((cos[hit] > np.float32(t)).sum()) for t in SD3_THRESHOLDS
                 if np.float32(t) >= np.float32(threshold)}, SD3_THRESHOLDS),
        },
    }


def _decision_rows(emb: Embedded, idx: np.ndarray, result: DedupResult, ref: dict | None) -> list[Row]:
    """Listing/decoding rejections + reference rejections + the core's decisions for rows `idx`."""

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


def _write_extras(out: Path, cfg: Config, inp: Side, valid: np.ndarray, rows: list[Row]) -> dict:
    """embeddings.parquet and duplicates.png, when the inputs were images."""
    from flowcurate.dedup.inputs import write_embeddings
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
            with open_binary(it.path) as fh:  # a tar member by its listed offset, never by its name
                data = read_member(fh, Member("", it.offset, it.size)) if it.offset >= 0 else fh.read()
            return decode_image(data, cfg.pipeline.max_pixels).image
        except Exception:  # the sheet shows a placeholder; the decision rows are already written
            return None

    outputs["contact_sheet_shows"] = contact_sheet(out / "duplicates.png", rows, read_image, cfg.dedup.threshold)
    outputs["contact_sheet"] = "duplicates.png"
    return outputs


def _summary(cfg: Config, request: Request, device: str, inp: Side, rows: list[Row], result: DedupResult,
             ref: dict | None, outputs: dict, timings: dict, sscd: dict | None, t_start: float) -> dict:
    emb = inp.embedded
    counts = {"inputs": len(rows), "kept": 0, "duplicate": 0, "rejected": 0}
    reasons: dict[str, int] = {}
    for r in rows:
        counts[r.status] += 1
        if r.reason:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    searched = [t for t in SD3_THRESHOLDS if np.float32(t) >= np.float32(cfg.dedup.threshold)]
    timings = {k: round(v, 3) for k, v in timings.items()}
    timings.update({k[2:]: round(v, 3) for k, v in result.stats.items() if k.startswith("t_") and k != "t_total"})
    timings["total"] = round(time.perf_counter() - t_start, 3)
    return {
        "format_version": SUMMARY_VERSION,
        "command": request.prog,
        "inputs": {"specs": list(request.inputs), "mode": inp.mode, "files": inp.files, "items": len(rows),
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
            **to_dict(cfg)["dedup"], "device": device, "batch_size": request.batch_size,
            "workers": request.workers,
            "skip_bad_embeddings": bool(request.skip_bad_embeddings), "similarity": "cosine, strict >",
        },
        "sscd": sscd,  # null when no image was embedded
        "search": {k: v for k, v in result.stats.items() if not k.startswith("t_")},
        "timings_s": timings,
        "outputs": outputs,
        "config": to_dict(cfg),
        "versions": _versions(),
    }


def _check_invariants(rows: list[Row], expected: int) -> None:
    """inputs = kept + duplicate + rejected; every duplicate_of names a kept key."""
    keys = [r.key for r in rows]
    if len(keys) != expected or len(set(keys)) != expected:
        raise RuntimeError(f"internal error: {len(set(keys))} unique rows for {expected} inputs")
    kept = {r.key for r in rows if r.status == "kept"}
    bad = [r.key for r in rows if r.status == "duplicate" and r.duplicate_of not in kept]
    if bad:
        raise RuntimeError(f"internal error: duplicate rows {bad[:3]} do not name a kept key")


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["flowcurate"] = version("flowcurate")
        out["faiss-cpu"] = version("faiss-cpu")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        pass
    return out
