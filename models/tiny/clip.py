"""A tiny full CLIP (text and vision towers) in a `CLIPModel` + `CLIPProcessor` folder, briefly fitted
contrastively on procedural images and their truthful captions: what `[pipeline] filters` entries load
in tests and the demo, the built-in `clip_score` (image-caption cosine) and `flowcurate filters fit`
(image embeddings for a linear probe) included.

    tiny://clip  ->  $FLOWCURATE_CACHE/tiny/clip-v{VERSION}-seed{S}-{source hash}/

Random weights do not separate "contains a red shape" (a linear probe on them is at chance); the
contrastive steps on captions that name every shape's colour are meant to fix that, but 300 steps at
32 features do not yet (held-out AUC about 0.5, tests/test_filters_fit.py): it needs more fitting.

Built on demand, apart from the other tiny models (`flowcurate.models.tiny`), since only filter configs
name it: building it does not rebuild them, and their cache does not depend on this file. Deterministic
for a seed (fixed step count, fixed batches), once per seed and source, under a lock, into a temporary
folder renamed into place. The tokenizer is the tiny SD3's CLIP-L one.
"""

from __future__ import annotations

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

VERSION = 1
LOCATION = f"{TINY_SCHEME}clip"
REPORT = "tiny_clip_report.json"
# 32 x 32 views in 8 x 8 patches; both towers project to 32 features
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act="quick_gelu")
PROJECTION = 32
STEPS, BATCH, LR = 300, 32, 2e-3  # fixed, never a time budget
PART = 10  # its stream in `sd3._seeded` (the SD3 parts use 0-4)
_SOURCES = ("clip.py", "procedural.py", "sd3.py")


@functools.cache
def source_hash() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_clip(out_dir: Path, seed: int = 0, steps: int = STEPS, log=print) -> dict:
    """Write the tiny CLIP folder into `out_dir` (which must not exist yet); returns a report."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flowcurate.models.tiny.procedural import caption, random_scene, render
    from flowcurate.models.tiny.sd3 import _seeded, _write_clip_files, tokenizers

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; build_clip writes a fresh folder")
    vocab, merges, (tok, _, _) = tokenizers()
    text = {**TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    size = VISION["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (images.image_mean, images.image_std))
    rng = np.random.default_rng([seed, PART])
    losses = []
    with torch.random.fork_rng(devices=[]):
        _seeded(seed, PART)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=PROJECTION))
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        model.train()
        for step in range(steps):
            scenes = [random_scene(rng) for _ in range(BATCH)]
            pixels = np.stack([np.asarray(render(s, size, size).convert("RGB")) for s in scenes])
            x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
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
