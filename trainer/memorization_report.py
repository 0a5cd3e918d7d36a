"""What `flowcurate memorization` writes (trainer/memorization.py computes it):

- OUTPUT/report.parquet: one row per generation (`REPORT_SCHEMA`);
- OUTPUT/summary.json: settings, the SSCD record and view, retrieval percentiles beside the training
  background, clique counts (memorized, exact sizes, undecided), per-prompt lines;
- OUTPUT/pairs.png: the most similar flagged generations beside their nearest training images (the
  original re-read from the manifest's `source`, else the training latent decoded with the AE).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from flowcurate.dedup.numerics import above
from flowcurate.dedup.report import report_similarity, sheet_font
from flowcurate.formats.files import write_atomic
from flowcurate.models.autoencoder import Autoencoder
from flowcurate.trainer.curated import Curated, training_image

if TYPE_CHECKING:  # annotations only: memorization.py imports this module
    from flowcurate.trainer.memorization import Models, Scores, Settings

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


def percentiles(x: np.ndarray) -> dict[str, float | None]:
    if len(x) == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None}
    x = np.asarray(x, np.float64)
    return {**{f"p{p}": report_similarity(np.percentile(x, p)) for p in PERCENTILES},
            "max": report_similarity(x.max())}


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
