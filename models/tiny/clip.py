"""A tiny full CLIP (text and vision towers) in a `CLIPModel` + `CLIPProcessor` folder, briefly fitted
contrastively on procedural images and their truthful captions: what `[pipeline] filters` entries load
in tests and the demo, the built-in `clip_score` (image-caption cosine) and `flowcurate filters fit`
(image embeddings for a linear probe) included.

    tiny://clip  ->  $FLOWCURATE_CACHE/tiny/clip-v{VERSION}-seed{S}-{source hash}/

Random weights do not separate "contains a red shape" (a linear probe on them is at chance), and
neither does plain contrastive fitting on independent scenes: a batch's captions are told apart by
the background alone. So every batch is made of twins that differ only in one shape's colour (half
the time a near colour: red against orange, brown or pink), the vision tower sees 4 x 4 patches, and
the views go through the processor's own resize, as the pipeline's do. tests/test_filters_fit.py
then recovers "contains a red shape" with a linear probe (held-out AUC > 0.95; BENCHMARKS.md, "Tiny
models", has the numbers over build seeds).

Built on demand, apart from the other tiny models (`flowcurate.models.tiny`), since only filter configs
name it: building it does not rebuild them, and their cache does not depend on this file. Deterministic
for a seed (fixed step count, fixed batches, one torch thread), once per seed and source, under a lock,
into a temporary folder renamed into place (about 3 minutes on one core). The tokenizer is the tiny
SD3's CLIP-L one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from flowcurate.formats.config import TINY_SCHEME
from flowcurate.formats.files import cache_root

VERSION = 2
LOCATION = f"{TINY_SCHEME}clip"
REPORT = "tiny_clip_report.json"
# 32 x 32 views in 4 x 4 patches (64 tokens); both towers 64 wide, projected to 64 features. The
# vision tower has 3 layers of 4 heads: with 2 of 2 its class token carried a red shape linearly for
# some build seeds and not others (held-out probe AUC 0.79-0.97 over seeds 0-3)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu")
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=4, hidden_act="quick_gelu")
PROJECTION = 64
STEPS, BATCH, LR = 1200, 64, 2e-3  # fixed, never a time budget
NEAR = 0.5  # the chance that a twin's new colour is one of the three nearest to the old one
RENDER = 64  # scenes are drawn at the pipeline's tiny resolution and resized by the CLIP processor
PART = 10  # its stream in `sd3._seeded` (the SD3 parts use 0-4)
_SOURCES = ("clip.py", "procedural.py", "sd3.py")


@functools.cache
def source_hash() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def recolour(scene, rng: np.random.Generator):
    """`scene` with one shape (picked at random) in another colour, never a background colour; with
    probability NEAR one of the three colours nearest (RGB) to the old one (red -> orange, brown, pink)."""
    from flowcurate.models.tiny.procedural import COLORS

    bg = set(scene.bg_colors) if scene.background != "plain" else {scene.bg_colors[0]}
    i = int(rng.integers(len(scene.shapes)))
    old = scene.shapes[i]
    choices = [c for c in COLORS if c not in bg and c != old.color]
    if rng.uniform() < NEAR:
        ref = np.array(COLORS[old.color], float)
        choices = sorted(choices, key=lambda c: float(np.sum((np.array(COLORS[c], float) - ref) ** 2)))[:3]
    new = dataclasses.replace(old, color=choices[int(rng.integers(len(choices)))])
    return dataclasses.replace(scene, shapes=scene.shapes[:i] + (new,) + scene.shapes[i + 1:])


def scene_batch(rng: np.random.Generator, n: int) -> list:
    """`n` random scenes as `n / 2` twins: a scene and the same scene with one shape recoloured.
    Captions in a batch then differ pairwise in one shape's colour, often a near one, so the contrastive
    loss cannot match them by the background alone. (Fitted on independent scenes, 1,500 steps reach a
    low loss and still leave "contains a red shape" at chance for a linear probe.)"""
    from flowcurate.models.tiny.procedural import random_scene

    scenes = []
    for _ in range(n // 2):
        scenes.append(random_scene(rng))
        scenes.append(recolour(scenes[-1], rng))
    return scenes


def build_clip(out_dir: Path, seed: int = 0, steps: int = STEPS, log=print) -> dict:
    """Write the tiny CLIP folder into `out_dir` (which must not exist yet); returns a report."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flowcurate.models.tiny.captioner import _torch_threads
    from flowcurate.models.tiny.procedural import caption, render
    from flowcurate.models.tiny.sd3 import _seeded, _write_clip_files, tokenizers

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; build_clip writes a fresh folder")
    vocab, merges, (tok, _, _) = tokenizers()
    text = {**TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    size = VISION["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    rng = np.random.default_rng([seed, PART])
    losses = []
    # one torch thread: the weights then do not depend on the machine's core count
    with torch.random.fork_rng(devices=[]), _torch_threads(1):
        _seeded(seed, PART)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=PROJECTION))
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        model.train()
        for step in range(steps):
            scenes = scene_batch(rng, BATCH)
            # the processor's own resize, as `filters` and `filters fit` feed it the pipeline's views
            x = images(images=[render(s, RENDER, RENDER).convert("RGB") for s in scenes],
                       return_tensors="pt")["pixel_values"]
            t = tok([caption(s) for s in scenes], padding=True, truncation=True, max_length=77,
                    return_tensors="pt")
            loss = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=x, return_loss=True).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if log and step % 100 == 0:
                log(f"[tiny-models] clip step {step}/{steps}: loss {losses[-1]:.3f}")
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out_dir)
    _write_clip_files(out_dir, vocab, merges)
    return {"version": VERSION, "seed": seed, "source_hash": source_hash(), "steps": steps,
            "loss_first": round(losses[0], 4) if losses else None, "loss_last": round(losses[-1], 4) if losses else None,
            "params": sum(p.numel() for p in model.parameters())}


def ensure_tiny_clip(seed: int = 0, log=print) -> Path:
    """The cached tiny CLIP folder for `seed`, built once (under a lock, moved into place atomically)."""
    from flowcurate.models.tiny import _locked

    final = cache_root() / "tiny" / f"clip-v{VERSION}-seed{seed}-{source_hash()}"
    if (final / REPORT).is_file():
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        if (final / REPORT).is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            log(f"[tiny-models] building clip ({STEPS} steps) ...")
            report = build_clip(tmp / "m", seed=seed, log=log)
            (tmp / "m" / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp / "m", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_clip(location: str, seed: int = 0, log=print) -> str:
    """`tiny://clip` -> the cached tiny CLIP's path; other `tiny://` names as `resolve_tiny`; else unchanged."""
    if location == LOCATION:
        return str(ensure_tiny_clip(seed, log=log))
    from flowcurate.models.tiny import resolve_tiny

    return resolve_tiny(location, seed, log=log)
