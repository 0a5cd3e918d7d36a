"""`flowcurate filters fit`: a linear probe for a `[pipeline] filters` entry, fitted on labelled images.

    flowcurate filters fit --images labels.csv --config my.toml --output head.safetensors [--filter NAME]

`labels.csv`: rows `path,label` (label 0 or 1; a header row is skipped; relative paths are relative
to the CSV's folder). Each image is validated and cut to the training view as pass 1 does (`[pipeline]`
resolution, min_size, max_aspect, aspect buckets), so the probe sees what the filter will score, and
embedded with the filter's CLIP (`--filter NAME`, or the config's only head filter; `--clip` instead):
the L2-normalised image embedding every head reads (`filters.embed_images`).

scikit-learn's `LogisticRegressionCV` fits the probe, its regularisation C chosen by stratified k-fold
cross-validation (log-loss) on the fitting part; a stratified held-out part (`--holdout`, 20 %) gives
precision and recall at probability 0.5 and the ROC AUC. The head is the probe's logit, a single
Linear (`weight` (1, D), `bias` (1,)) in safetensors, the format `filters.load_head` reads: as a filter,
`min = 0.0` keeps what the probe calls positive. `head.json` beside it records how it was made.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

EPILOG = """\
examples:
  flowcurate filters fit --images labels.csv --config my.toml --output heads/red.safetensors
  flowcurate filters fit --images labels.csv --config tiny --clip tiny://clip --output red.safetensors
then, in the config:
  [pipeline] filters = [{name = "red", clip = "<the same CLIP>", head = "heads/red.safetensors", min = 0.0}]
"""


def read_labels(path: Path) -> list[tuple[Path, int]]:
    """`path,label` rows -> [(image path, 0 | 1)]; a first row whose label is not 0/1 is a header."""
    out = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{i + 1}: expected `path,label`, got {row}")
            label = row[1].strip()
            if label not in ("0", "1"):
                if i == 0:
                    continue  # a header
                raise ValueError(f"{path}:{i + 1}: label {label!r} is not 0 or 1")
            image = Path(row[0].strip()).expanduser()
            out.append((image if image.is_absolute() else path.parent / image, int(label)))
    if len({y for _, y in out}) < 2:
        raise ValueError(f"{path}: a probe needs images of both labels, got {len(out)} rows")
    return out


def embed_files(files: list[Path], clip_location: str, pc, device: str = "cpu", batch: int = 32):
    """Image files -> ((n, D) float32 embeddings of the ones that validate, their indices into `files`)."""
    import numpy as np

    from flowcurate.formats.images import ImageRejected
    from flowcurate.pipeline.filters import embed_images, load_image_clip
    from flowcurate.pipeline.validate import aspect_buckets, validate

    processor, clip = load_image_clip(clip_location, device)
    buckets = aspect_buckets(pc.resolution, pc.max_aspect) if pc.aspect_buckets else None
    views, used, out = [], [], []
    for i, f in enumerate(files):
        try:
            views.append(validate(f.read_bytes(), resolution=pc.resolution, min_size=pc.min_size,
                                  max_aspect=pc.max_aspect, max_pixels=pc.max_pixels, buckets=buckets).image)
            used.append(i)
        except ImageRejected as e:
            print(f"skipped {f}: {e.reason}", file=sys.stderr)
        if len(views) == batch or (i == len(files) - 1 and views):
            out.append(embed_images(processor, clip, views, device).cpu().numpy())
            views = []
    if not out:
        raise ValueError("no image validated: nothing to fit on")
    return np.concatenate(out).astype(np.float32), used


def fit_probe(x, y, holdout: float = 0.2, folds: int = 5, seed: int = 0) -> tuple:
    """(n, D) embeddings, (n,) 0/1 labels -> (weight (1, D), bias (1,), report with the held-out metrics)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import precision_score, recall_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = np.asarray(y)
    idx = np.arange(len(y))
    fit_idx, test_idx = (train_test_split(idx, test_size=holdout, stratify=y, random_state=seed) if holdout > 0
                         else (idx, idx[:0]))
    probe = LogisticRegressionCV(Cs=np.logspace(-2, 4, 13).tolist(), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                 scoring="neg_log_loss", max_iter=10_000, l1_ratios=(0.0,),
                                 use_legacy_attributes=False)
    probe.fit(x[fit_idx], y[fit_idx])
    report = {"images": int(len(y)), "positives": int(y.sum()), "fit": int(len(fit_idx)), "held_out": int(len(test_idx)),
              "C": float(np.ravel(probe.C_)[0]), "folds": folds}
    if len(test_idx):
        score = probe.decision_function(x[test_idx])
        pred = (score > 0).astype(int)
        report.update(precision=float(precision_score(y[test_idx], pred, zero_division=0)),
                      recall=float(recall_score(y[test_idx], pred, zero_division=0)),
                      auc=float(roc_auc_score(y[test_idx], score)) if len(set(y[test_idx])) == 2 else None)
    return probe.coef_.astype(np.float32).reshape(1, -1), probe.intercept_.astype(np.float32).reshape(1), report


def pick_clip(cfg, name: str | None, clip: str | None) -> str:
    """The CLIP to embed with: `--clip`, else the named filter's, else the config's only head filter's."""
    if clip:
        return clip
    filters = [f for f in cfg.pipeline.filters if f.get("kind", "head") == "head"]
    if name:
        match = [f for f in cfg.pipeline.filters if f.get("name") == name]
        if not match:
            raise ValueError(f"--filter {name}: no such filter in {cfg.source} ({[f.get('name') for f in cfg.pipeline.filters]})")
        return match[0]["clip"]
    if len(filters) != 1:
        raise ValueError(f"{cfg.source} has {len(filters)} head filters: name one with --filter, or pass --clip")
    return filters[0]["clip"]


def run_fit(args) -> int:
    import numpy as np
    from safetensors.numpy import save_file

    from flowcurate.formats.config import load_config, resolve_device
    from flowcurate.formats.files import write_atomic
    from flowcurate.models.tiny.clip import resolve_clip

    cfg = load_config(args.config)
    location = pick_clip(cfg, args.filter, args.clip)
    clip = resolve_clip(location, log=lambda m: print(m, file=sys.stderr))
    rows = read_labels(Path(args.images))
    x, used = embed_files([p for p, _ in rows], clip, cfg.pipeline, resolve_device(args.device or cfg.pipeline.device))
    y = np.array([rows[i][1] for i in used])
    weight, bias, report = fit_probe(x, y, holdout=args.holdout, folds=args.folds, seed=args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight, "bias": bias}, str(out))
    report = {**report, "clip": location, "labels": str(args.images), "skipped": len(rows) - len(used),
              "resolution": cfg.pipeline.resolution, "threshold": "score > 0 (probability 0.5)"}
    write_atomic(out.with_suffix(".json"), (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    held = (f"precision {report['precision']:.3f}, recall {report['recall']:.3f}, AUC {report['auc']:.3f} on "
            f"{report['held_out']} held-out images" if report["held_out"] else "no held-out images (--holdout 0)")
    print(f"{held}; C = {report['C']:.3g} by {args.folds}-fold cross-validation on {report['fit']}; head -> {out}")
    return 0


def add_filters_parser(sub) -> None:
    p = sub.add_parser("filters", help="model-based filters: fit a linear probe head on labelled images")
    fsub = p.add_subparsers(dest="filters_command", metavar="SUBCOMMAND", required=True)
    f = fsub.add_parser("fit", help="embed labelled images with a filter's CLIP and fit a linear probe head",
                        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--images", required=True, help="CSV of image path and 0/1 label")
    f.add_argument("--config", default="sd3", help="preset name or TOML path whose [pipeline] filters name the CLIP")
    f.add_argument("--output", required=True, help="the head, .safetensors (head.json beside it)")
    f.add_argument("--filter", default=None, help="the filter whose CLIP embeds (default: the config's only head filter)")
    f.add_argument("--clip", default=None, help="a CLIP location instead of a filter's (tiny://clip: the tiny one)")
    f.add_argument("--holdout", type=float, default=0.2, help="stratified fraction held out for the metrics")
    f.add_argument("--folds", type=int, default=5, help="cross-validation folds choosing C")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default=None, help="override [pipeline] device")
    f.set_defaults(func=run_fit)
