"""`flowcurate memorization`: does a trained model reproduce its training images? (SD3 App. E.3)

K generations per prompt (seeds recorded), made with the run's EMA weights and decoded with the
autoencoder of its conditioning record, go through two tests:

- retrieval (Somepalli et al. 2023): each generation's SSCD descriptor, computed with the model and
  preprocessing the curation recorded in `OUT/stats.json`, is searched among the training images'
  descriptors (of their training crops, `OUT/crop_embeddings/`, or of the whole originals for older
  outputs; the training set is the manifest's kept rows in `train-` shards). A
  top-1 cosine above the threshold (0.5, strict `>`, as SD3 and Somepalli et al.) flags the generation.
  The top-1 cosines are reported as percentiles beside the background: each training image's top-1
  cosine among the other training images.
- clique (SD3 Algorithm 2, after Carlini et al. 2023): per prompt, two generations closer than eps
  (0.15) in tiled l2 are joined by an edge; the generations of a clique of at least T (10) are
  memorized, and so is their prompt. Tiled l2: pixels in [0, 1], a 4x4 grid of tiles scaled to the
  image size, the RMS difference inside each tile (Carlini's l2 normalised by dimension), the maximum
  over tiles (plain l2 let all-grey backgrounds match, SD3 App. E.3). The question is decided per
  generation (trainer/cliques.py) by a branch-and-bound search that stops at the first clique of T
  (`clique_test`), not by listing every maximal clique, which is exponential in the density (64
  generations at edge probability 0.9 took over 20 s; SD3 uses 500). Hence, in report.parquet: `clique_size` is the largest
  clique *found* containing the generation, a lower bound on the largest there is (before, the largest
  itself), exact where `clique_exact`; `memorized` is unchanged (a clique of >= T exists); a generation
  whose search spends `clique_budget` expanded search nodes without an answer is `clique_undecided`
  (counted in summary.json; it is not memorized as far as found). summary.json's `largest_clique` is
  the largest found.

Prompts (trainer/curated.py, which reads the curated folder): by default the original captions of the
most-duplicated training images (SD3 prompts with its 350k most-duplicated examples) plus a seeded
random sample of training captions; or a file, one prompt a line.

`run` = `load_models` (the only place model locations, `tiny://` included, become paths) ->
`generate_and_score` -> `write_report` (trainer/memorization_report.py): OUTPUT/report.parquet (one
row per generation), summary.json
and pairs.png (each flagged generation beside its nearest training image: the original re-read from
the manifest's `source`, or the training latent decoded with the AE when it cannot be read here).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowcurate.dedup.kmeans import in_kmeans_sample
from flowcurate.dedup.numerics import above, exact_dots, unit_rows
from flowcurate.formats import shards as S
from flowcurate.formats.config import resolve_device
from flowcurate.models.autoencoder import Autoencoder
from flowcurate.models.mmdit import MMDiT
from flowcurate.models.sscd import SSCDPreprocess, embed, load_sscd
from flowcurate.models.text_encoders import TextEncoders
from flowcurate.trainer.cliques import (
    CLIQUE_BUDGET,
    EPS,
    GRID,
    MIN_CLIQUE,
    CliqueAnswers,
    clique_edges,
    clique_test,
    concat_answers,
    tiled_distances,
)
from flowcurate.trainer.curated import (
    Curated,
    MemorizationError,
    Prompt,
    default_prompts,
    read_curated,
    read_prompt_file,
)
from flowcurate.trainer.memorization_report import write_report
from flowcurate.trainer.sample import (
    MODEL_ROLES,
    StepProgress,
    generate,
    load_autoencoder,
    load_run,
    load_text_encoders,
    model_paths,
    sampling_settings,
)

THRESHOLD = 0.5  # SSCD cosine: SD3 App. E.3 and Somepalli et al.


# ------------------------------------------------------------------------------------------------------
# Retrieval test

class Nearest:
    """Top-1 search among training descriptors `train` (N, D) unit rows. FAISS (exact inner product)
    proposes the top k; `flowcurate.dedup.numerics.exact_dots` re-scores them, so near ties do not depend on BLAS
    order, and ties go to the lower index."""

    def __init__(self, train: np.ndarray, k: int = 8):
        import faiss

        self.train, self.k = np.ascontiguousarray(train, np.float32), k
        self.index = faiss.IndexFlatIP(train.shape[1])
        self.index.add(self.train)

    def __call__(self, queries: np.ndarray, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) unit rows -> (Q,) index of the most similar training row and its cosine
        (float32). `exclude` (Q,): a training row each query must not match (itself, for the background)."""
        k = min(len(self.train), self.k + (exclude is not None))
        _, cand = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        cos = exact_dots(np.repeat(queries, k, axis=0), self.train[cand.ravel()]).reshape(len(queries), k)
        if exclude is not None:
            cos = np.where(cand == np.asarray(exclude)[:, None], -np.inf, cos)
        best = cos.max(axis=1, keepdims=True)
        return np.where(cos == best, cand, len(self.train)).min(axis=1), best[:, 0].astype(np.float32)


def background(curated: Curated, search: Nearest, max_queries: int = 10_000) -> np.ndarray:
    """Top-1 cosine of training images to the *other* training images: what unrelated-but-similar
    looks like in this data. At most ~`max_queries` queries, chosen by key hash (input-order free)."""
    n = len(curated.keys)
    if n < 2:
        return np.zeros(0, np.float32)
    rows = np.arange(n)
    if n > max_queries:
        rows = np.array([i for i, k in enumerate(curated.keys) if in_kmeans_sample(k, max_queries / n)], int)
    return search(curated.embeddings[rows], exclude=rows)[1]


def sscd_embed(model, pre: SSCDPreprocess, images: np.ndarray, device: str = "cpu",
               batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> (N, D) float32 unit descriptors, preprocessed as recorded."""
    out = [embed(model, torch.stack([pre(Image.fromarray(im)) for im in images[s:s + batch_size]]), device)
           for s in range(0, len(images), batch_size)]
    return unit_rows(np.concatenate(out))


# ------------------------------------------------------------------------------------------------------
# The check: load the run's models, generate and score, write the report

@dataclass(frozen=True)
class Settings:
    seeds: int = 16  # K generations per prompt (SD3 and Carlini et al.: 500)
    first_seed: int = 0  # seeds first_seed .. first_seed + K - 1, the same for every prompt
    steps: int | None = None  # Euler steps (None: the run's sample_steps)
    cfg: float | None = None  # guidance scale (None: the run's)
    shift: float | None = None  # timestep shift (None: the run's)
    size: tuple[int, int] | None = None  # (H, W) (None: the run's training resolution)
    threshold: float = THRESHOLD
    eps: float = EPS
    min_clique: int = MIN_CLIQUE
    grid: int = GRID
    clique_budget: int = CLIQUE_BUDGET  # search nodes per generation before its clique answer is undecided
    background_queries: int = 10_000
    max_pairs: int = 30
    batch_size: int = 32
    weights: str = "ema"
    device: str = "cpu"
    verify: bool = True


@dataclass
class Models:
    """What the check runs: the trained model (`settings.weights`) and the AE and text encoders of its
    conditioning record, and the SSCD model the training descriptors were made with."""

    step: Path  # the checkpoint folder
    state: dict  # its state.json
    model: MMDiT
    ae: Autoencoder
    te: TextEncoders
    sscd: torch.nn.Module


def load_models(checkpoint: str | Path, sscd_location: str, st: Settings) -> Models:
    """The command's one resolution of model locations: the run's record names the AE and the text
    encoders, the curated folder (or --sscd) the SSCD model; `tiny://` ones become cache paths here,
    and the loaders only see paths."""
    from flowcurate.models.tiny import resolve_tiny

    step, record, model, state = load_run(checkpoint, st.weights, st.device)
    paths = model_paths(record, MODEL_ROLES)
    sscd_path = resolve_tiny(sscd_location, log=lambda *a: None)
    return Models(step, state, model, load_autoencoder(record, paths["autoencoder"], st.device, st.verify),
                  load_text_encoders(record, paths, st.device, st.verify), load_sscd(sscd_path, st.device))


@dataclass
class Scores:
    """K = len(seeds) generations per prompt, prompt-major (generation g: prompt g // K, seed g % K)."""

    prompts: list[Prompt]
    seeds: list[int]
    size: tuple[int, int]
    steps: int
    cfg: float
    shift: float
    nearest: np.ndarray  # (G,) index into curated.keys of the top-1 training image by SSCD cosine
    similarity: np.ndarray  # (G,) its cosine (float32)
    clique: CliqueAnswers  # (G,) the clique test, each generation among its prompt's K
    shown: list[tuple[float, int, np.ndarray]]  # (similarity, generation, image): the most similar flagged
    background: np.ndarray  # top-1 cosine of training images among the other training images


def generate_and_score(m: Models, curated: Curated, prompts: list[Prompt], st: Settings,
                       log: Callable[[str], None] = print) -> Scores:
    """K seeded generations per prompt, each scored by retrieval (top-1 SSCD cosine against the training
    set) and by the clique test among its prompt's K. Prompts are processed a few at a time
    (batch_size // K of them), so memory holds one group's images, not all of them."""
    size = tuple(st.size or m.state.get("sample_size") or ())
    if len(size) != 2:
        raise MemorizationError(f"{m.step}: the run recorded no image size (it never trained a step); pass --size H W")
    steps, cfg, shift = sampling_settings(m.state["config"]["train"], st.steps, st.cfg, st.shift)
    search = Nearest(curated.embeddings)
    empty = m.te.encode([""])
    seeds = list(range(st.first_seed, st.first_seed + st.seeds))
    k, group = len(seeds), max(1, st.batch_size // len(seeds))
    log(f"memorization: {len(prompts)} prompts x {k} seeds at {size[0]}x{size[1]} ({steps} Euler steps, "
        f"cfg {cfg:g}) from {m.step}, against {len(curated.keys)} training images")
    idx, sim, clique = [], [], []
    shown: list[tuple[float, int, np.ndarray]] = []
    batches = sum(-(-min(group, len(prompts) - s) * k // st.batch_size) for s in range(0, len(prompts), group))
    model = StepProgress(m.model, batches * steps, f"generating {len(prompts) * k} images")
    for s in range(0, len(prompts), group):
        chunk = prompts[s:s + group]
        enc = m.te.encode([p.text for p in chunk])
        rows, row_seeds = np.repeat(np.arange(len(chunk)), k), seeds * len(chunk)
        imgs = np.concatenate([
            generate(model, m.ae, {p: enc[p][rows[b:b + st.batch_size]] for p in S.PARTS}, empty, size,
                     row_seeds[b:b + st.batch_size], steps, shift, cfg)
            for b in range(0, len(rows), st.batch_size)])
        i, c = search(sscd_embed(m.sscd, curated.preprocess, imgs, st.device))
        idx.append(i)
        sim.append(c)
        clique += [clique_test(clique_edges(tiled_distances(imgs[j:j + k], st.grid), st.eps), st.min_clique,
                               st.clique_budget) for j in range(0, len(imgs), k)]
        shown += [(float(c[j]), s * k + j, imgs[j]) for j in np.flatnonzero(above(c, st.threshold))]
        shown = sorted(shown, key=lambda x: (-x[0], x[1]))[:st.max_pairs]
    model.close()
    return Scores(prompts, seeds, size, steps, cfg, shift, np.concatenate(idx), np.concatenate(sim),
                  concat_answers(clique), shown, background(curated, search, st.background_queries))


def run(checkpoint: str | Path, curated: Curated, prompts: list[Prompt], output: Path,
        settings: Settings = Settings(), log: Callable[[str], None] = print) -> dict:
    """The check: load the models, generate and score, write OUTPUT/{report.parquet, summary.json,
    pairs.png}; returns the summary."""
    started, st = time.time(), settings
    if st.min_clique > st.seeds:
        raise MemorizationError(f"a clique of {st.min_clique} needs at least that many seeds per prompt, "
                                f"got {st.seeds}")
    if not prompts:
        raise MemorizationError("no prompts")
    models = load_models(checkpoint, curated.sscd_location, st)
    scores = generate_and_score(models, curated, prompts, st, log)
    return write_report(scores, models, curated, output, st, log, started)


# ------------------------------------------------------------------------------------------------------
# CLI

def run_cli(args) -> int:
    try:
        curated = read_curated(Path(args.curated))
        if args.sscd:
            curated.sscd_location = args.sscd
        prompts = (read_prompt_file(Path(args.prompts)) if args.prompts else
                   default_prompts(curated, args.top_duplicated, args.random_prompts, args.prompt_seed))
        settings = Settings(seeds=args.seeds, first_seed=args.first_seed, steps=args.steps, cfg=args.cfg,
                            shift=args.shift, size=tuple(args.size) if args.size else None,
                            threshold=args.threshold, eps=args.eps, min_clique=args.min_clique,
                            clique_budget=args.clique_budget,
                            background_queries=args.background_queries, max_pairs=args.max_pairs,
                            batch_size=args.batch_size, weights=args.weights, device=resolve_device(args.device),
                            verify=not args.no_verify)
        run(args.checkpoint, curated, prompts, Path(args.output), settings)
    except MemorizationError as e:
        print(f"flowcurate memorization: {e}", file=sys.stderr)
        return 2
    return 0

