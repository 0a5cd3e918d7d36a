"""`flowcurate memorization`: does a trained model reproduce its training images? (SD3 App. E.3)

K generations per prompt (seeds recorded), made with the run's EMA weights and decoded with the
autoencoder of its conditioning record, go through two tests:

- retrieval (Somepalli et al. 2023): each generation's SSCD descriptor, computed with the model and
  preprocessing the curation recorded in `OUT/stats.json`, is searched among the training images'
  descriptors (`OUT/embeddings/`; the training set is the manifest's kept rows in `train-` shards). A
  top-1 cosine above the threshold (0.5, strict `>`, as SD3 and Somepalli et al.) flags the generation.
  The top-1 cosines are reported as percentiles beside the background: each training image's top-1
  cosine among the other training images.
- clique (SD3 Algorithm 2, after Carlini et al. 2023): per prompt, two generations closer than eps
  (0.15) in tiled l2 are joined by an edge; the generations of a clique of at least T (10) are
  memorized, and so is their prompt. Tiled l2: pixels in [0, 1], a 4x4 grid of tiles scaled to the
  image size, the RMS difference inside each tile (Carlini's l2 normalised by dimension), the maximum
  over tiles (plain l2 let all-grey backgrounds match, SD3 App. E.3). The question is decided per
  generation by a branch-and-bound search that stops at the first clique of T (`clique_test`), not by
  listing every maximal clique, which is exponential in the density (64 generations at edge
  probability 0.9 took over 20 s; SD3 uses 500). Hence, in report.parquet: `clique_size` is the largest
  clique *found* containing the generation, a lower bound on the largest there is (before, the largest
  itself), exact where `clique_exact`; `memorized` is unchanged (a clique of >= T exists); a generation
  whose search spends `clique_budget` expanded search nodes without an answer is `clique_undecided`
  (counted in summary.json; it is not memorized as far as found). summary.json's `largest_clique` is
  the largest found.

Prompts (trainer/curated.py, which reads the curated folder): by default the original captions of the
most-duplicated training images (SD3 prompts with its 350k most-duplicated examples) plus a seeded
random sample of training captions; or a file, one prompt a line.

`run` = `load_models` (the only place model locations, `tiny://` included, become paths) ->
`generate_and_score` -> `write_report`: OUTPUT/report.parquet (one row per generation), summary.json
and pairs.png (each flagged generation beside its nearest training image: the original re-read from
the manifest's `source`, or the training latent decoded with the AE when it cannot be read here).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from flowcurate.dedup.kmeans import in_kmeans_sample
from flowcurate.dedup.numerics import above, exact_dots, unit_rows
from flowcurate.dedup.report import report_similarity, sheet_font
from flowcurate.formats import shards as S
from flowcurate.formats.config import resolve_device
from flowcurate.formats.files import write_atomic
from flowcurate.models.autoencoder import Autoencoder
from flowcurate.models.mmdit import MMDiT
from flowcurate.models.sscd import SSCDPreprocess, embed, load_sscd
from flowcurate.models.text_encoders import TextEncoders
from flowcurate.trainer.curated import (
    Curated,
    MemorizationError,
    Prompt,
    default_prompts,
    read_curated,
    read_prompt_file,
    training_image,
)
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
EPS = 0.15  # tiled l2 on [0, 1] pixels: SD3 Algorithm 2 / Carlini et al.
MIN_CLIQUE = 10  # Carlini et al.'s clique size T
GRID = 4  # 4x4 tiles (SD3: 16 tiles of 128x128 on 512x512 images)
PERCENTILES = (50, 90, 99)

REPORT_SCHEMA = pa.schema([
    ("prompt_index", pa.int32()),
    ("prompt", pa.string()),
    ("prompt_origin", pa.string()),  # duplicated | random | file
    ("prompt_key", pa.string()),  # the training image whose caption the prompt is (null for a file prompt)
    ("prompt_duplicates", pa.int32()),  # manifest rows naming prompt_key as duplicate_of
    ("seed", pa.int64()),
    ("nearest_key", pa.string()),  # top-1 training image by SSCD cosine
    ("similarity", pa.float32()),  # its cosine, to 1e-3
    ("nearest_is_prompt_key", pa.bool_()),
    ("flagged", pa.bool_()),  # retrieval: similarity > threshold
    ("clique_size", pa.int32()),  # largest clique found of this prompt's generations containing this one
    ("clique_exact", pa.bool_()),  # clique_size is the largest there is (else a lower bound)
    ("memorized", pa.bool_()),  # clique: a clique of >= T was found (clique_size >= T)
    ("clique_undecided", pa.bool_()),  # the search ran out of budget: not memorized as far as found
    ("prompt_memorized", pa.bool_()),  # some generation of this prompt is memorized
])


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


def percentiles(x: np.ndarray) -> dict[str, float | None]:
    if len(x) == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None}
    x = np.asarray(x, np.float64)
    return {**{f"p{p}": report_similarity(np.percentile(x, p)) for p in PERCENTILES},
            "max": report_similarity(x.max())}


def sscd_embed(model, pre: SSCDPreprocess, images: np.ndarray, device: str = "cpu",
               batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> (N, D) float32 unit descriptors, preprocessed as recorded."""
    out = [embed(model, torch.stack([pre(Image.fromarray(im)) for im in images[s:s + batch_size]]), device)
           for s in range(0, len(images), batch_size)]
    return unit_rows(np.concatenate(out))


# ------------------------------------------------------------------------------------------------------
# Clique test (SD3 Algorithm 2)

def tiled_distances(images: np.ndarray, grid: int = GRID) -> np.ndarray:
    """images (N, H, W, 3) uint8 -> (N, N) float64: the maximum over a grid x grid tiling (tile edges
    at round(i H / grid)) of the RMS difference of [0, 1] pixels inside a tile."""
    x = np.asarray(images, np.float64) / 255.0
    n, h, w = x.shape[:3]
    if h < grid or w < grid:
        raise ValueError(f"{h}x{w} images cannot be cut into {grid}x{grid} tiles")
    ys, xs = np.linspace(0, h, grid + 1).round().astype(int), np.linspace(0, w, grid + 1).round().astype(int)
    dist = np.zeros((n, n))
    for i in range(grid):
        for j in range(grid):
            t = x[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].reshape(n, -1)
            sq = (t * t).sum(axis=1)
            d2 = (sq[:, None] + sq[None, :] - 2 * t @ t.T) / t.shape[1]
            dist = np.maximum(dist, np.sqrt(np.clip(d2, 0, None)))
    np.fill_diagonal(dist, 0.0)
    return dist


CLIQUE_BUDGET = 20_000  # search nodes expanded per generation before its answer is "undecided"


@dataclass(frozen=True)
class CliqueAnswers:
    """Per node of one prompt's graph: is it in a clique of at least T? (SD3 Algorithm 2's question)

    `size` is the largest clique found containing the node: a lower bound on the largest there is, and
    exactly it where `exact` (the bound met an upper bound: the node's core number + 1, or T - 1 once the
    search proved there is no clique of T). `memorized`: a clique of >= T was found (so `size >= T`).
    `undecided`: the search for this node spent its budget without finding such a clique or proving there
    is none; it is not memorized as far as anyone knows. `expanded`: search nodes expanded in all."""

    size: np.ndarray  # (N,) int32
    exact: np.ndarray  # (N,) bool
    memorized: np.ndarray  # (N,) bool
    undecided: np.ndarray  # (N,) bool
    expanded: int


def clique_edges(dist: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(N, N) distances -> (N, N) bool adjacency: an edge wherever d < eps, none on the diagonal."""
    edges = np.asarray(dist) < eps
    np.fill_diagonal(edges, False)
    return edges


def _bitsets(edges: np.ndarray) -> list[int]:
    """Row i of a bool matrix -> a Python int with bit j set where edges[i, j]: set algebra on a few
    hundred nodes becomes one machine-speed operation on the int's limbs."""
    packed = np.packbits(edges, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def _degeneracy(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, core): nodes in the order repeatedly taking a node of least remaining degree removes them
    (Matula-Beck), and each node's core number. A clique of s nodes lies in the (s-1)-core, so core + 1
    bounds the largest clique through a node."""
    n = len(edges)
    deg = edges.sum(axis=1).astype(np.int64)
    removed = np.zeros(n, bool)
    order, core = np.empty(n, np.int64), np.empty(n, np.int64)
    k = 0
    for i in range(n):
        v = int(np.argmin(np.where(removed, n + 1, deg)))
        k = max(k, int(deg[v]))
        order[i], core[v], removed[v] = v, k, True
        deg -= edges[v]
    return order, core


def _branch_set(cand: int, excl: list[int], kmin: int) -> int:
    """The nodes of `cand` worth branching on when `kmin` more clique nodes are needed: those left after
    kmin - 1 greedy colour classes (Tomita's MCQ colouring bound, on bitsets as in San Segundo's BBMC).

    The nodes inside those classes form kmin - 1 independent sets, so they alone hold a clique of at most
    kmin - 1: every clique of kmin in `cand` has a node outside them. Branching on each outside node (the
    branch taking the remaining candidates, the classes included) therefore misses none. With a fixed
    target the later classes' colours never prune, so they are not computed. `excl[v]` is the
    complement of v's closed neighbourhood: one AND per coloured node."""
    uncoloured = cand
    for _ in range(kmin - 1):
        free = uncoloured
        if not free:
            break
        while free:
            low = free & -free
            uncoloured ^= low
            free &= excl[low.bit_length() - 1]
    return uncoloured


def _grow(clique: list[int], cand: int, adj: list[int], prefer: int) -> list[int]:
    """`clique` grown greedily to a maximal clique from `cand` (its common neighbours), taking a node of
    `prefer` while there is one, the lowest bit first."""
    while cand:
        pick = cand & prefer or cand
        low = pick & -pick
        clique.append(low.bit_length() - 1)
        cand &= adj[clique[-1]]
    return clique


def _search(root: int, cand: int, adj: list[int], excl: list[int], t: int,
            budget: int) -> tuple[list[int] | None, list[int], int]:
    """A clique of >= t nodes containing `root`, all others from `cand` (root's neighbours).

    Branch and bound (MCQ with a fixed target): depth first, branching only on the nodes the colouring
    bound leaves (`_branch_set`), the highest core first; it stops at the first clique of t. Iterative,
    with an explicit stack (one frame per clique node, so the depth is at most t). Returns (the clique or
    None, the deepest clique seen, nodes expanded); None with `expanded >= budget` means the budget ran
    out (undecided), otherwise that there is none."""
    path = [root]
    deepest = [root]
    if t <= 1:
        return path, path, 0
    if cand.bit_count() < t - 1:
        return None, deepest, 0
    stack = [[cand, _branch_set(cand, excl, t - 1)]]
    expanded = 0
    while stack:
        frame = stack[-1]
        branch = frame[1]
        if not branch:
            stack.pop()
            path.pop()
            continue
        low = branch & -branch
        v = low.bit_length() - 1
        frame[1] = branch ^ low
        cand = frame[0]
        frame[0] = cand ^ low  # v's siblings do not look at v again
        cand &= adj[v]
        expanded += 1
        path.append(v)
        if len(path) > len(deepest):
            deepest = path.copy()
        if len(path) >= t:
            return path, path, expanded
        if expanded >= budget:
            return None, deepest, expanded
        if len(path) + cand.bit_count() >= t:
            branch = _branch_set(cand, excl, t - len(path))
            if branch:
                stack.append([cand, branch])
                continue
        path.pop()
    return None, deepest, expanded


def clique_test(edges: np.ndarray, min_clique: int = MIN_CLIQUE, budget: int = CLIQUE_BUDGET) -> CliqueAnswers:
    """For each node of an undirected graph ((N, N) bool, symmetric, no diagonal): is it in a clique of
    at least `min_clique` (T) nodes? Exact, except for nodes whose search expands more than `budget`
    search nodes: those are reported undecided.

    Listing every maximal clique (Bron-Kerbosch) answers this too, but its cost grows exponentially with
    the graph's density: 64 generations joined with probability 0.9 took over 20 s, and SD3 uses 500. The
    question needs far less:

    - a node of core number < T - 1 is in no clique of T (a clique of T is in the (T-1)-core);
    - a greedy clique through each node gives every node a size, and those of T or more are answered;
    - the other nodes, least core first, try a greedy clique again (among the nodes still in question)
      and, when it falls short, search their neighbourhood for T - 1 more (`_search`); the
      first clique of T found stops the search, and every node of it (grown to a maximal clique, for the
      size column) is answered yes at once, so a dense graph needs a few searches, not one per node;
    - a node answered no leaves the graph (it is in no clique of T, so no clique of T needs it), which
      lowers its neighbours' degrees; those below T - 1 leave too. Later searches look at fewer nodes.
    Nodes are renumbered so the bit order is highest core first: the colouring bound is tighter and a
    search meets big cliques early. The answers do not depend on the input order (the sizes found may)."""
    edges = np.asarray(edges, bool)
    n, t = len(edges), int(min_clique)
    if edges.shape != (n, n) or (edges != edges.T).any() or edges.diagonal().any():
        raise ValueError("edges must be a symmetric (N, N) bool matrix with an empty diagonal")
    order, core = _degeneracy(edges)
    node = order[::-1].copy()  # bit p is node[p]: the highest core first
    adj = _bitsets(ranked := edges[np.ix_(node, node)])
    excl = [~(a | 1 << v) for v, a in enumerate(adj)]
    core_ranked = core[node]

    size = np.ones(n, np.int64)
    for v in range(n):  # a quick greedy clique through each node: a lower bound for those never searched
        clique, cand = [v], adj[v]
        while cand:
            low = cand & -cand
            clique.append(low.bit_length() - 1)
            cand &= adj[clique[-1]]
        for u in clique:
            size[u] = max(size[u], len(clique))

    yes, undecided = size >= t, np.zeros(n, bool)  # a greedy clique of t is an answer already
    yes_bits = sum(1 << v for v in np.flatnonzero(yes).tolist())
    in_graph = core_ranked >= t - 1  # the nodes still in question (or answered yes), also as a bitset
    alive = sum(1 << v for v in np.flatnonzero(in_graph).tolist())
    degree = (ranked & in_graph).sum(axis=1)

    def leave(v: int) -> None:
        """v is in no clique of t: drop it, and every node that falls below t - 1 neighbours after."""
        nonlocal alive
        todo = [v]
        while todo:
            u = todo.pop()
            if not in_graph[u]:
                continue
            in_graph[u], undecided[u] = False, False
            alive &= ~(1 << u)
            degree[ranked[u]] -= 1
            todo += np.flatnonzero(ranked[u] & in_graph & (degree < t - 1)).tolist()

    expanded = 0
    for v in range(n - 1, -1, -1):  # least core first: cheap answers, and the graph shrinks
        if yes[v] or not in_graph[v]:
            continue
        if degree[v] < t - 1:
            leave(v)
            continue
        # first a greedy clique through v, new nodes first: in a dense graph it is the answer
        found, work = _grow([v], adj[v] & alive, adj, alive & ~yes_bits), 0
        if len(found) < t:
            found, deepest, work = _search(v, adj[v] & alive, adj, excl, t, budget)
            expanded += work
            for u in deepest:
                size[u] = max(size[u], len(deepest))
        if found is not None:
            common = alive
            for u in found:
                common &= adj[u]
            # grown to a maximal clique, new nodes first: a better size for its members, and more of them
            # answered by this one search
            clique = _grow(list(found), common, adj, alive & ~yes_bits)
            for u in clique:
                yes[u], undecided[u] = True, False
                size[u] = max(size[u], len(clique))
                yes_bits |= 1 << u
        elif work >= budget:
            undecided[v] = True
        else:
            leave(v)

    upper = np.where(yes, core_ranked + 1, np.minimum(core_ranked + 1, max(t - 1, 1)))
    upper = np.where(undecided, core_ranked + 1, upper)
    back = np.empty(n, np.int64)
    back[node] = np.arange(n)  # ranked position of each input node
    return CliqueAnswers(size[back].astype(np.int32), (size >= upper)[back], yes[back], undecided[back], expanded)


def concat_answers(parts: Sequence[CliqueAnswers]) -> CliqueAnswers:
    """The answers of several graphs, one after the other (work summed)."""
    return CliqueAnswers(*(np.concatenate([getattr(a, f) for a in parts])
                           for f in ("size", "exact", "memorized", "undecided")), sum(a.expanded for a in parts))


def _maximal_cliques(adj: Sequence[set[int]]) -> list[frozenset[int]]:
    """Every maximal clique of an undirected graph (Bron-Kerbosch with pivoting); `adj[v]` excludes v.
    Exponential in the density: kept as the reference the tests and benchmarks/memorization_cliques.py
    check `clique_test` against."""
    found: list[frozenset[int]] = []

    def expand(r: frozenset[int], p: set[int], x: set[int]) -> None:
        if not p and not x:
            found.append(r)
            return
        pivot = max(p | x, key=lambda u: len(adj[u] & p))
        for v in list(p - adj[pivot]):
            expand(r | {v}, p & adj[v], x & adj[v])
            p.remove(v)
            x.add(v)

    expand(frozenset(), set(range(len(adj))), set())
    return found


def _exhaustive_clique_sizes(edges: np.ndarray) -> np.ndarray:
    """(N, N) bool adjacency -> (N,) size of the largest clique containing each node, by listing every
    maximal clique (the reference; a node alone is a clique of 1)."""
    edges = np.asarray(edges, bool)
    adj = [set(np.flatnonzero(row).tolist()) - {i} for i, row in enumerate(edges)]
    best = np.ones(len(edges), np.int32)
    for c in _maximal_cliques(adj):
        for v in c:
            best[v] = max(best[v], len(c))
    return best


def pairs_sheet(path: Path, pairs: list[tuple[Image.Image, Image.Image | None, str, str]], note: str,
                thumb: int = 128, cols: int = 3) -> None:
    """pairs: (generation, training image or None, label under the generation, label under the
    training image) -> a PNG of side-by-side pairs, `cols` pairs a row; `note` heads it."""
    label_h, title_h, gap = 30, 24, 12
    cell_w = 2 * thumb + gap
    rows = -(-len(pairs) // cols)
    sheet = Image.new("RGB", (cols * cell_w + 8, title_h + rows * (thumb + label_h) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 5), note, fill="black", font=sheet_font(14))
    small = sheet_font(11)
    for i, (gen, train, gen_label, train_label) in enumerate(pairs):
        x0, y0 = 4 + (i % cols) * cell_w, title_h + (i // cols) * (thumb + label_h)
        for j, (img, label) in enumerate(((gen, gen_label), (train, train_label))):
            x = x0 + j * thumb
            if img is None:
                draw.rectangle((x + 1, y0 + 1, x + thumb - 2, y0 + thumb - 2), outline=(150, 150, 150))
                draw.line((x, y0, x + thumb, y0 + thumb), fill=(150, 150, 150))
            else:
                scale = thumb / max(img.size)  # small generations are scaled up, with visible pixels
                im = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)
                sheet.paste(im, (x + (thumb - im.width) // 2, y0 + (thumb - im.height) // 2))
            for n, line in enumerate(label.split("\n")[:2]):
                draw.text((x + 2, y0 + thumb + 1 + 13 * n), line[:24], fill=(0, 0, 0), font=small)
    sheet.save(path, format="PNG")


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


def report_columns(sc: Scores, curated: Curated, st: Settings) -> dict[str, list | np.ndarray]:
    """report.parquet's columns (REPORT_SCHEMA), one row per generation."""
    prompts, k = sc.prompts, len(sc.seeds)
    pi = np.repeat(np.arange(len(prompts)), k)
    memorized = sc.clique.memorized
    nearest_keys = [curated.keys[i] for i in sc.nearest]
    return {
        "prompt_index": pi, "prompt": [prompts[i].text for i in pi], "prompt_origin": [prompts[i].origin for i in pi],
        "prompt_key": [prompts[i].key for i in pi], "prompt_duplicates": [prompts[i].duplicates for i in pi],
        "seed": np.tile(sc.seeds, len(prompts)), "nearest_key": nearest_keys,
        "similarity": [report_similarity(x) for x in sc.similarity],
        "nearest_is_prompt_key": [prompts[p].key == key for p, key in zip(pi, nearest_keys)],
        "flagged": above(sc.similarity, st.threshold), "clique_size": sc.clique.size,
        "clique_exact": sc.clique.exact, "memorized": memorized, "clique_undecided": sc.clique.undecided,
        "prompt_memorized": memorized.reshape(len(prompts), k).any(axis=1)[pi]}


def write_pairs(path: Path, sc: Scores, curated: Curated, ae: Autoencoder, threshold: float) -> dict[str, int]:
    """pairs.png: the most similar flagged generations beside their nearest training images; returns
    how many training images came from their source, a decoded latent, or nowhere."""
    k, origins, pairs = len(sc.seeds), {}, []
    for c, g, img in sc.shown:
        key = curated.keys[sc.nearest[g]]
        train_img, origins[key] = training_image(curated, key, ae)
        label = f"seed {sc.seeds[g % k]}  sim {c:.3f}\n{sc.prompts[g // k].text}"
        pairs.append((Image.fromarray(img), train_img, label,
                      key + {"latent": "\n(decoded latent)", "missing": "\n(unreadable)"}.get(origins[key], "")))
    flagged = int(above(sc.similarity, threshold).sum())
    note = f"{flagged} of {len(sc.similarity)} generations above SSCD {threshold:g}" + (
        f"; the {len(sc.shown)} most similar: generation | nearest training image" if sc.shown else "")
    write_atomic(path, lambda tmp: pairs_sheet(tmp, pairs, note))
    return {f"from_{o}": sum(v == o for v in origins.values()) for o in ("source", "latent", "missing")}


def write_report(sc: Scores, m: Models, curated: Curated, output: Path, st: Settings,
                 log: Callable[[str], None] = print, started: float | None = None) -> dict:
    """OUTPUT/{report.parquet, pairs.png, summary.json}; returns the summary."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    columns = report_columns(sc, curated, st)
    table = pa.table({n: pa.array(columns[n], REPORT_SCHEMA.field(n).type) for n in REPORT_SCHEMA.names},
                     schema=REPORT_SCHEMA)
    write_atomic(output / "report.parquet", lambda tmp: pq.write_table(table, tmp))
    from_origin = write_pairs(output / "pairs.png", sc, curated, m.ae, st.threshold)

    prompts, sim, clique, pi = sc.prompts, sc.similarity, sc.clique.size, columns["prompt_index"]
    flagged, memorized, undecided = columns["flagged"], columns["memorized"], columns["clique_undecided"]
    prompt_mem = memorized.reshape(len(prompts), len(sc.seeds)).any(axis=1)
    prompt_undecided = ~prompt_mem & undecided.reshape(len(prompts), len(sc.seeds)).any(axis=1)
    summary = {
        "checkpoint": str(m.step), "step": m.state["step"], "weights": st.weights, "curated": str(curated.root),
        "settings": {**asdict(st), "size": list(sc.size), "steps": sc.steps, "cfg": sc.cfg, "shift": sc.shift,
                     "seed_values": sc.seeds},
        "sscd": {"location": curated.sscd_location, "preprocess": curated.preprocess.record(),
                 "view": curated.view},
        "generations": len(sim), "prompts": len(prompts), "training_images": len(curated.keys),
        "retrieval": {
            "threshold": st.threshold, "flagged": int(flagged.sum()), "fraction_flagged": float(flagged.mean()),
            "nearest_is_prompt_key": int(sum(columns["nearest_is_prompt_key"])),
            "similarity": percentiles(sim), "background": percentiles(sc.background),
            "background_queries": len(sc.background)},
        "clique": {
            "eps": st.eps, "min_clique": st.min_clique, "grid": st.grid,
            "memorized_generations": int(memorized.sum()), "memorized_prompts": int(prompt_mem.sum()),
            "fraction_prompts_memorized": float(prompt_mem.mean()), "largest_clique": int(clique.max()),
            "exact_sizes": int(sc.clique.exact.sum()),  # generations whose clique_size is the largest there is
            "budget": st.clique_budget, "expanded": sc.clique.expanded,
            "undecided_generations": int(undecided.sum()), "undecided_prompts": int(prompt_undecided.sum())},
        "pairs_png": {"shown": len(sc.shown), **from_origin},
        "per_prompt": [
            {"prompt": p.text, "origin": p.origin, "key": p.key, "duplicates": p.duplicates,
             "flagged": int(flagged[pi == i].sum()), "max_similarity": report_similarity(sim[pi == i].max()),
             "largest_clique": int(clique[pi == i].max()), "memorized": bool(prompt_mem[i]),
             "undecided": int(undecided[pi == i].sum())}
            for i, p in enumerate(prompts)],
        "seconds": round(time.time() - (started or time.time()), 1),
    }
    write_atomic(output / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    r, c = summary["retrieval"], summary["clique"]
    log(f"retrieval: {r['flagged']}/{len(sim)} generations above {st.threshold:g} (top-1 similarity "
        f"{r['similarity']}; training background {r['background']}); clique: {c['memorized_prompts']}/"
        f"{len(prompts)} prompts memorized (cliques >= {st.min_clique} at eps {st.eps:g})"
        + (f", {c['undecided_prompts']} undecided (search budget {st.clique_budget} spent)" if c["undecided_prompts"]
           else "") + f"; wrote {output}")
    return summary


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

