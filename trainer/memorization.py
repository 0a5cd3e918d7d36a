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
  over tiles (plain l2 let all-grey backgrounds match, SD3 App. E.3).

Prompts: by default the original captions of the most-duplicated training images (most manifest rows
naming them as `duplicate_of`; SD3 prompts with its 350k most-duplicated examples) plus a seeded random
sample of training captions; or a file, one prompt a line.

Writes OUTPUT/report.parquet (one row per generation), summary.json and pairs.png (each flagged
generation beside its nearest training image: the original re-read from the manifest's `source`, or
the training latent decoded with the AE when the original cannot be read here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from flowcurate.dedup.inputs import read_embeddings
from flowcurate.dedup.kmeans import in_kmeans_sample
from flowcurate.dedup.numerics import above, exact_dots, unit_rows
from flowcurate.dedup.report import report_similarity, sheet_font
from flowcurate.formats import shards as S
from flowcurate.formats.files import write_atomic
from flowcurate.formats.images import ImageRejected, decode_image
from flowcurate.models.autoencoder import Autoencoder, to_model_space
from flowcurate.models.sscd import SSCDPreprocess, embed, load_sscd
from flowcurate.trainer.sample import (
    generate,
    load_autoencoder,
    load_run,
    load_text_encoders,
    sampling_settings,
)

THRESHOLD = 0.5  # SSCD cosine: SD3 App. E.3 and Somepalli et al.
EPS = 0.15  # tiled l2 on [0, 1] pixels: SD3 Algorithm 2 / Carlini et al.
MIN_CLIQUE = 10  # Carlini et al.'s clique size T
GRID = 4  # 4x4 tiles (SD3: 16 tiles of 128x128 on 512x512 images)
PERCENTILES = (50, 90, 99)
STATS_JSON = "stats.json"

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
    ("clique_size", pa.int32()),  # largest clique of this prompt's generations containing this one
    ("memorized", pa.bool_()),  # clique: clique_size >= T
    ("prompt_memorized", pa.bool_()),  # some generation of this prompt is memorized
])


class MemorizationError(ValueError):
    """Inputs that cannot be checked: no training images, missing embeddings, a bad stats.json."""


# ------------------------------------------------------------------------------------------------------
# The curated output folder (what `flowcurate run` writes)

@dataclass
class Curated:
    root: Path
    keys: list[str]  # the training set: kept rows in train- shards, sorted
    embeddings: np.ndarray  # (N, D) float32 unit rows, in `keys` order
    rows: dict[str, dict]  # training key -> its manifest row (source, shard, caption_original, ...)
    duplicates: dict[str, int]  # training key -> manifest rows naming it as duplicate_of
    sscd_location: str
    preprocess: SSCDPreprocess


def preprocess_from_record(rec: dict) -> SSCDPreprocess:
    """`SSCDPreprocess.record()` -> the same preprocessing (only square bilinear resizes exist)."""
    if rec.get("resize", "square") != "square" or rec.get("interpolation", "bilinear") != "bilinear":
        raise MemorizationError(f"SSCD preprocessing {rec} is not the square bilinear resize this version makes")
    return SSCDPreprocess(size=int(rec["size"]), mean=tuple(rec["mean"]), std=tuple(rec["std"]))


def read_curated(out: Path) -> Curated:
    """Manifest, embeddings and SSCD record of a curated folder `OUT` (DESIGN.md "Data contracts")."""
    out = Path(out)
    try:
        sscd = json.loads((out / STATS_JSON).read_text())["sscd"]
        location, pre = sscd["location"], preprocess_from_record(sscd["preprocess"])
    except (OSError, ValueError, KeyError) as e:
        raise MemorizationError(f"{out / STATS_JSON}: no usable \"sscd\" entry with location and preprocess "
                                f"({e!r}); it names the SSCD model the training embeddings were made with") from None
    if not (out / "manifest").is_dir():
        raise MemorizationError(f"{out}: no manifest/ folder; --curated is the output folder of `flowcurate run`")
    table = pq.read_table(out / "manifest", columns=["key", "source", "status", "duplicate_of", "caption_original",
                                                     "shard"])
    train = table.filter(pc.and_(pc.equal(table["status"], "kept"), pc.starts_with(table["shard"], "train-")))
    if train.num_rows == 0:
        raise MemorizationError(f"{out}/manifest: no kept rows in train- shards")
    rows = {r["key"]: r for r in train.to_pylist()}
    counts = table.filter(pc.equal(table["status"], "duplicate"))["duplicate_of"].value_counts().to_pylist()
    duplicates = {k: 0 for k in rows}
    duplicates.update((c["values"], c["counts"]) for c in counts if c["values"] in rows)
    found: dict[str, np.ndarray] = {}
    for f in sorted((out / "embeddings").glob("*.parquet")):
        e = read_embeddings(f)
        found.update((k, e.embeddings[i]) for i, k in enumerate(e.keys) if k in rows)
    keys = sorted(rows)
    missing = [k for k in keys if k not in found]
    if missing:
        raise MemorizationError(f"{out}/embeddings: {len(missing)} training keys have no embedding, "
                                f"e.g. {missing[:3]}")
    emb = unit_rows(np.stack([found[k] for k in keys]))
    return Curated(out, keys, emb, rows, duplicates, location, pre)


# ------------------------------------------------------------------------------------------------------
# Prompts

@dataclass(frozen=True)
class Prompt:
    text: str
    origin: str  # duplicated | random | file
    key: str | None = None
    duplicates: int = 0


def default_prompts(curated: Curated, top: int, n_random: int, seed: int = 0) -> list[Prompt]:
    """The captions of the `top` most-duplicated training images (ties: by key), then `n_random` more
    drawn with `seed` from the rest; one prompt per distinct caption."""
    def caption(k):
        return (curated.rows[k]["caption_original"] or "").strip()

    keys = [k for k in curated.keys if caption(k)]
    ranked = sorted((k for k in keys if curated.duplicates[k] > 0), key=lambda k: (-curated.duplicates[k], k))
    chosen = [(k, "duplicated") for k in ranked[:top]]
    rest = sorted(set(keys) - {k for k, _ in chosen})
    picks = np.random.default_rng(seed).permutation(len(rest))[:n_random]
    chosen += [(rest[i], "random") for i in sorted(picks)]
    prompts, seen = [], set()
    for k, origin in chosen:
        if caption(k) not in seen:
            seen.add(caption(k))
            prompts.append(Prompt(caption(k), origin, k, curated.duplicates[k]))
    return prompts


def read_prompt_file(path: Path) -> list[Prompt]:
    """One prompt per non-empty line."""
    prompts = [Prompt(line.strip(), "file") for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise MemorizationError(f"{path}: no prompts")
    return prompts


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


def maximal_cliques(adj: Sequence[set[int]]) -> list[frozenset[int]]:
    """Every maximal clique of an undirected graph (Bron-Kerbosch with pivoting); `adj[v]` excludes v."""
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


def clique_sizes(dist: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(N, N) distances -> (N,) size of the largest clique containing each node, in the graph with an
    edge wherever d < eps (a node alone is a clique of 1)."""
    n = len(dist)
    adj = [set(np.flatnonzero(dist[i] < eps).tolist()) - {i} for i in range(n)]
    best = np.ones(n, np.int32)
    for c in maximal_cliques(adj):
        for v in c:
            best[v] = max(best[v], len(c))
    return best


# ------------------------------------------------------------------------------------------------------
# Training images for pairs.png

def _read_source(source: str) -> Image.Image | None:
    """The original from `uri#member` (a local tar) or `uri` (a local file); None when not readable here."""
    path, _, member = source.partition("#")
    try:
        if Path(source).is_file():  # a file (whose name may hold a '#')
            data = Path(source).read_bytes()
        elif member and tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                fh = tar.extractfile(tar.getmember(member))  # read into memory, never extracted to disk
                data = fh.read() if fh else b""
        else:
            return None
        return decode_image(data).image
    except (OSError, KeyError, ImageRejected, tarfile.TarError):
        return None


def read_latent(curated: Curated, key: str) -> np.ndarray:
    """The stored posterior mean (C, h, w) of a training key, from the shard the manifest names."""
    with tarfile.open(curated.root / "shards" / curated.rows[key]["shard"]) as tar:
        return S.load_npy(tar.extractfile(f"{key}.latent_mean.npy").read()).astype(np.float32)


def training_image(curated: Curated, key: str, ae: Autoencoder) -> tuple[Image.Image | None, str]:
    """(image, "source" | "latent" | "missing"): the original when it can be read here, else the
    training latent decoded with the run's autoencoder."""
    img = _read_source(curated.rows[key]["source"] or "")
    if img is not None:
        return img, "source"
    try:
        z = to_model_space(torch.from_numpy(read_latent(curated, key))[None], ae.scaling_factor, ae.shift_factor)
        return Image.fromarray(ae.decode(z)[0]), "latent"
    except (OSError, KeyError, tarfile.TarError):
        return None, "missing"


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
# The check

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
    background_queries: int = 10_000
    max_pairs: int = 30
    batch_size: int = 32
    weights: str = "ema"
    device: str = "cpu"
    verify: bool = True


def run(checkpoint: str | Path, curated: Curated, prompts: list[Prompt], output: Path,
        settings: Settings = Settings(), sscd=None, log: Callable[[str], None] = print) -> dict:
    """Generate, test, and write OUTPUT/{report.parquet, summary.json, pairs.png}; returns the summary.
    `sscd`: an already loaded SSCD model (default: the one stats.json names). Prompts are processed a
    few at a time (batch_size // K of them), so memory holds one group's images, not all of them."""
    t0, st = time.time(), settings
    if st.min_clique > st.seeds:
        raise MemorizationError(f"a clique of {st.min_clique} needs at least that many seeds per prompt, "
                                f"got {st.seeds}")
    if not prompts:
        raise MemorizationError("no prompts")
    step, record, model, state = load_run(checkpoint, st.weights, st.device)
    size = tuple(st.size or state.get("sample_size") or ())
    if len(size) != 2:
        raise MemorizationError(f"{step}: the run recorded no image size (it never trained a step); pass --size H W")
    steps, cfg, shift = sampling_settings(state["config"]["train"], st.steps, st.cfg, st.shift)
    ae = load_autoencoder(record, st.device, verify=st.verify)
    te = load_text_encoders(record, st.device, verify=st.verify)
    if sscd is None:
        from flowcurate.models.tiny import resolve_tiny  # a tiny:// location (tests, demo) -> the cached file

        sscd = load_sscd(resolve_tiny(curated.sscd_location, log=lambda *a: None), st.device)
    search = Nearest(curated.embeddings)
    empty = te.encode([""])
    seeds = list(range(st.first_seed, st.first_seed + st.seeds))
    k, group = len(seeds), max(1, st.batch_size // len(seeds))
    log(f"memorization: {len(prompts)} prompts x {k} seeds at {size[0]}x{size[1]} ({steps} Euler steps, "
        f"cfg {cfg:g}) from {step}, against {len(curated.keys)} training images")

    idx, sim, clique = [], [], []
    shown: list[tuple[float, int, np.ndarray]] = []  # (similarity, generation, image): the top flagged
    for s in range(0, len(prompts), group):
        chunk = prompts[s:s + group]
        enc = te.encode([p.text for p in chunk])
        rows, row_seeds = np.repeat(np.arange(len(chunk)), k), seeds * len(chunk)
        imgs = np.concatenate([
            generate(model, ae, {p: enc[p][rows[b:b + st.batch_size]] for p in S.PARTS}, empty, size,
                     row_seeds[b:b + st.batch_size], steps, shift, cfg)
            for b in range(0, len(rows), st.batch_size)])
        i, c = search(sscd_embed(sscd, curated.preprocess, imgs, st.device))
        idx.append(i)
        sim.append(c)
        clique += [clique_sizes(tiled_distances(imgs[j:j + k], st.grid), st.eps) for j in range(0, len(imgs), k)]
        shown += [(float(c[j]), s * k + j, imgs[j]) for j in np.flatnonzero(above(c, st.threshold))]
        shown = sorted(shown, key=lambda x: (-x[0], x[1]))[:st.max_pairs]
        if (s // group) % 10 == 9:
            log(f"  {s + group}/{len(prompts)} prompts")
    idx, sim, clique = np.concatenate(idx), np.concatenate(sim), np.concatenate(clique)

    pi = np.repeat(np.arange(len(prompts)), k)
    flagged, memorized = above(sim, st.threshold), clique >= st.min_clique
    prompt_mem = memorized.reshape(len(prompts), k).any(axis=1)
    nearest_keys = [curated.keys[i] for i in idx]
    columns = {
        "prompt_index": pi, "prompt": [prompts[i].text for i in pi], "prompt_origin": [prompts[i].origin for i in pi],
        "prompt_key": [prompts[i].key for i in pi], "prompt_duplicates": [prompts[i].duplicates for i in pi],
        "seed": np.tile(seeds, len(prompts)), "nearest_key": nearest_keys,
        "similarity": [report_similarity(x) for x in sim],
        "nearest_is_prompt_key": [prompts[p].key == key for p, key in zip(pi, nearest_keys)],
        "flagged": flagged, "clique_size": clique, "memorized": memorized, "prompt_memorized": prompt_mem[pi]}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = pa.table({n: pa.array(columns[n], REPORT_SCHEMA.field(n).type) for n in REPORT_SCHEMA.names},
                     schema=REPORT_SCHEMA)
    write_atomic(output / "report.parquet", lambda tmp: pq.write_table(table, tmp))

    origins: dict[str, str] = {}
    pairs = []
    for c, g, img in shown:
        key = nearest_keys[g]
        train_img, origins[key] = training_image(curated, key, ae)
        pairs.append((Image.fromarray(img), train_img, f"seed {seeds[g % k]}  sim {c:.3f}\n{prompts[g // k].text}",
                      key + {"latent": "\n(decoded latent)", "missing": "\n(unreadable)"}.get(origins[key], "")))
    note = f"{int(flagged.sum())} of {len(sim)} generations above SSCD {st.threshold:g}" + (
        f"; the {len(shown)} most similar: generation | nearest training image" if shown else "")
    write_atomic(output / "pairs.png", lambda tmp: pairs_sheet(tmp, pairs, note))

    bg = background(curated, search, st.background_queries)
    summary = {
        "checkpoint": str(step), "step": state["step"], "weights": st.weights, "curated": str(curated.root),
        "settings": {**asdict(st), "size": list(size), "steps": steps, "cfg": cfg, "shift": shift,
                     "seed_values": seeds},
        "sscd": {"location": curated.sscd_location, "preprocess": curated.preprocess.record()},
        "generations": len(sim), "prompts": len(prompts), "training_images": len(curated.keys),
        "retrieval": {
            "threshold": st.threshold, "flagged": int(flagged.sum()), "fraction_flagged": float(flagged.mean()),
            "nearest_is_prompt_key": int(sum(columns["nearest_is_prompt_key"])),
            "similarity": percentiles(sim), "background": percentiles(bg), "background_queries": len(bg)},
        "clique": {
            "eps": st.eps, "min_clique": st.min_clique, "grid": st.grid,
            "memorized_generations": int(memorized.sum()), "memorized_prompts": int(prompt_mem.sum()),
            "fraction_prompts_memorized": float(prompt_mem.mean()), "largest_clique": int(clique.max())},
        "pairs_png": {"shown": len(shown), **{f"from_{o}": sum(v == o for v in origins.values())
                                              for o in ("source", "latent", "missing")}},
        "per_prompt": [
            {"prompt": p.text, "origin": p.origin, "key": p.key, "duplicates": p.duplicates,
             "flagged": int(flagged[pi == i].sum()), "max_similarity": report_similarity(sim[pi == i].max()),
             "largest_clique": int(clique[pi == i].max()), "memorized": bool(prompt_mem[i])}
            for i, p in enumerate(prompts)],
        "seconds": round(time.time() - t0, 1),
    }
    write_atomic(output / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    r, c = summary["retrieval"], summary["clique"]
    log(f"retrieval: {r['flagged']}/{len(sim)} generations above {st.threshold:g} (top-1 similarity "
        f"{r['similarity']}; training background {r['background']}); clique: {c['memorized_prompts']}/"
        f"{len(prompts)} prompts memorized (cliques >= {st.min_clique} at eps {st.eps:g}); wrote {output}")
    return summary


# ------------------------------------------------------------------------------------------------------
# CLI

def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "memorization", help="check a trained model for memorized training images (SD3 App. E.3)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate K images per prompt with a trained run and test them: SSCD retrieval against "
                    "the training images of the curated folder (flagged above --threshold) and SD3's clique "
                    "test (Algorithm 2: cliques of >= --min-clique generations closer than --eps in tiled l2).",
        epilog="examples:\n"
               "  flowcurate memorization --checkpoint run/ --curated out/ --output report/\n"
               "  flowcurate memorization --checkpoint run/checkpoints/step-004000 --curated out/ \\\n"
               "      --output report/ --top-duplicated 100 --random-prompts 100 --seeds 32 --steps 28 --cfg 5\n"
               "  flowcurate memorization --checkpoint run/ --curated out/ --prompts prompts.txt --output report/\n"
               "writes report/report.parquet (one row per generation), report/summary.json, report/pairs.png")
    p.add_argument("--checkpoint", required=True, help="run folder (its latest step) or a step folder")
    p.add_argument("--curated", required=True, help="the curated folder the run was trained from (flowcurate run's "
                                                    "OUT: manifest/, embeddings/, shards/, stats.json)")
    p.add_argument("--output", required=True, help="report folder")
    p.add_argument("--prompts", help="prompt file, one a line (default: captions of training images, below)")
    p.add_argument("--top-duplicated", type=int, default=32,
                   help="captions of the N training images with the most near-duplicates (default 32)")
    p.add_argument("--random-prompts", type=int, default=32, help="plus N random training captions (default 32)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the random caption sample")
    p.add_argument("--seeds", type=int, default=16, help="generations per prompt, K (default 16; SD3 used 500)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST .. FIRST+K-1, the same for every prompt")
    p.add_argument("--steps", type=int, help="Euler steps (default: the run's sample_steps)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the run's)")
    p.add_argument("--shift", type=float, help="timestep shift (default: the run's)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the run's)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="SSCD cosine above which a generation is "
                                                                      "flagged (default 0.5)")
    p.add_argument("--eps", type=float, default=EPS, help="tiled-l2 edge threshold (default 0.15)")
    p.add_argument("--min-clique", type=int, default=MIN_CLIQUE, help="clique size T that marks memorization "
                                                                       "(default 10)")
    p.add_argument("--background-queries", type=int, default=10_000,
                   help="training images whose top-1 training neighbour makes the background (default 10000)")
    p.add_argument("--max-pairs", type=int, default=30, help="flagged pairs shown in pairs.png (default 30)")
    p.add_argument("--batch-size", type=int, default=32, help="generations per forward batch")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--sscd", help="SSCD model to use instead of the one stats.json names (same weights!)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-verify", action="store_true", help="skip the content-hash check of AE and encoders")
    p.set_defaults(func=run_cli)
    return p


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
                            background_queries=args.background_queries, max_pairs=args.max_pairs,
                            batch_size=args.batch_size, weights=args.weights, device=args.device,
                            verify=not args.no_verify)
        run(args.checkpoint, curated, prompts, Path(args.output), settings)
    except MemorizationError as e:
        print(f"flowcurate memorization: {e}", file=sys.stderr)
        return 2
    return 0
