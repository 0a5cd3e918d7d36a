"""Procedural edit triplets with known answers: a tiny, checkable instruction-editing task.

A triplet is (source scene, instruction, edited scene) drawn with `procedural.render`: "make the
circle red" recolours one shape, "move the square left" moves it by a quarter of the image, "remove
the triangle" deletes it. Scenes have a plain background and one or two shapes of different kinds, so
"the circle" names exactly one shape. Because both scenes are known, whether a model's output made
the edit is measured, not judged (`score_edit`):

- every kind: over the pixels the edit changes (source vs edited render differ), the output is closer
  to the edited image than to the source (`closer_to_edit`);
- recolour: the mean hue of the output inside the shape moves toward the target colour's hue
  (`hue_toward_target`), the issue's "the circle's mean hue moves toward red".

`write_edit_shards` turns triplets into editing shards (`formats/edit_shards.py`) with the real tiny
autoencoder (posteriors of the source and edited images) and the real tiny text encoders
(`models/text_encoders.TextEncoders`, the instruction in the `orig` slot): the encoders the pipeline
uses. `write_edit_data` writes triplets as *raw* edit data instead, in the public InstructPix2Pix
layout (Hugging Face Parquet), with planted duplicates and broken triplets, for `flowcurate run
--task edit` to curate (`flowcurate sample-data --edit`).

Everything is a pure function of a `numpy.random.Generator`, like `procedural.py`.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowcurate.models.tiny.procedural import COLORS, Scene, Shape, render

EDIT_KINDS = ("recolor", "move", "remove")
# colours with a well-defined hue (the recolour measure compares hues), and the shapes instructions name
EDIT_COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
EDIT_SHAPES = ("circle", "square", "triangle")
BACKGROUND_COLORS = ("white", "gray", "black")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
MOVE = 0.25  # a move is a quarter of the image side


@dataclass(frozen=True)
class Triplet:
    source: Scene
    edited: Scene
    instruction: str
    kind: str  # one of EDIT_KINDS
    target: int  # index of the edited shape in source.shapes
    answer: dict  # what the edit does, JSON: kind, shape, and from/to colour, direction or nothing

    def images(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, edited) as uint8 (size, size, 3)."""
        return np.asarray(render(self.source, size)), np.asarray(render(self.edited, size))


def _fits(shape: Shape, others: list[Shape]) -> bool:
    inside = shape.r + 0.02 <= shape.cx <= 1 - shape.r - 0.02 and shape.r + 0.02 <= shape.cy <= 1 - shape.r - 0.02
    return inside and all(math.hypot(shape.cx - o.cx, shape.cy - o.cy) > shape.r + o.r + 0.02 for o in others)


def _scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 3))
    kinds = rng.choice(len(EDIT_SHAPES), size=n, replace=False)
    shapes: list[Shape] = []
    for k in kinds:
        for _ in range(50):
            r = float(rng.uniform(0.14, 0.2))
            s = Shape(EDIT_SHAPES[k], EDIT_COLORS[rng.integers(len(EDIT_COLORS))],
                      *(float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2)), r, float(rng.uniform(0, 360)))
            if _fits(s, shapes):
                shapes.append(s)
                break
    bg = BACKGROUND_COLORS[rng.integers(len(BACKGROUND_COLORS))]
    return Scene("plain", (bg, bg), 0.0, tuple(shapes))


def random_triplet(rng: np.random.Generator, kinds: tuple[str, ...] = EDIT_KINDS) -> Triplet:
    """One triplet of a kind drawn from `kinds` (redrawn until the scene allows it: a move needs room)."""
    while True:
        scene, kind = _scene(rng), kinds[rng.integers(len(kinds))]
        i = int(rng.integers(len(scene.shapes)))
        shape, others = scene.shapes[i], [s for j, s in enumerate(scene.shapes) if j != i]
        if kind == "recolor":
            color = EDIT_COLORS[rng.choice([c for c in range(len(EDIT_COLORS)) if EDIT_COLORS[c] != shape.color])]
            new = dataclasses.replace(shape, color=color)
            instruction = f"make the {shape.kind} {color}"
            answer = {"kind": kind, "shape": shape.kind, "from": shape.color, "to": color}
        elif kind == "move":
            ways = [d for d, (dx, dy) in DIRECTIONS.items()
                    if _fits(dataclasses.replace(shape, cx=shape.cx + MOVE * dx, cy=shape.cy + MOVE * dy), others)]
            if not ways:
                continue
            way = ways[rng.integers(len(ways))]
            dx, dy = DIRECTIONS[way]
            new = dataclasses.replace(shape, cx=shape.cx + MOVE * dx, cy=shape.cy + MOVE * dy)
            instruction = f"move the {shape.kind} {way}"
            answer = {"kind": kind, "shape": shape.kind, "direction": way}
        elif kind == "remove":
            new = None
            instruction = f"remove the {shape.kind}"
            answer = {"kind": kind, "shape": shape.kind}
        else:
            raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
        shapes = [new if j == i else s for j, s in enumerate(scene.shapes)]
        edited = dataclasses.replace(scene, shapes=tuple(s for s in shapes if s is not None))
        return Triplet(scene, edited, instruction, kind, i, answer)


def triplets(n: int, seed: int, kinds: tuple[str, ...] = EDIT_KINDS) -> list[Triplet]:
    rng = np.random.default_rng(seed)
    return [random_triplet(rng, kinds) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------
# Measuring an edit

def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))[0]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def score_edit(triplet: Triplet, output: np.ndarray) -> dict:
    """What an output image (uint8 (H, W, 3), square) did with the triplet's instruction:
    `closer_to_edit` (over the pixels the edit changes, mean |output - edited| < mean |output - source|),
    the two distances, and for a recolour `hue_toward_target` (the mean hue inside the shape is nearer
    the target colour's hue than the source's was) with the hue distances."""
    src, edited = triplet.images(output.shape[0])
    out = output.astype(np.float32)
    changed = np.abs(src.astype(np.float32) - edited.astype(np.float32)).sum(-1) > 30
    if not changed.any():
        raise ValueError(f"{triplet.instruction!r} changes no pixel at {output.shape[0]} px")
    d_edit = float(np.abs(out - edited)[changed].mean())
    d_src = float(np.abs(out - src)[changed].mean())
    result = {"kind": triplet.kind, "instruction": triplet.instruction, "closer_to_edit": d_edit < d_src,
              "distance_to_edit": d_edit, "distance_to_source": d_src}
    if triplet.kind == "recolor":
        target = _hue(COLORS[triplet.answer["to"]])
        before = _hue_distance(_hue(src.astype(np.float32)[changed].mean(0)), target)  # as `out`, in float32
        after = _hue_distance(_hue(out[changed].mean(0)), target)
        result.update(hue_toward_target=after < before, hue_distance_before=before, hue_distance_after=after)
    return result


# ------------------------------------------------------------------------------------------------------
# Editing shards from triplets, through the real (tiny) autoencoder and text encoders

def write_edit_shards(out: Path, items: list[Triplet], sd3: str, size: int = 64, *, label: str | None = None,
                      shard_size: int = 256, val_fraction: float = 0.0, batch: int = 32,
                      key_prefix: str = "edit", t5_length: int = 77) -> dict:
    """Write `items` as editing shards under `out` (OUT/conditioning.json + .npz, OUT/shards/*.tar,
    OUT/shards/index.json; formats/edit_shards.py), encoding both images of each triplet with the
    autoencoder of the SD3 folder `sd3` and its instruction with the folder's text encoders. `label`:
    the source the record names (`tiny://sd3` for the tiny models); `t5_length`: T5 tokens (the
    pipeline's `t5_max_length`). Each distinct instruction is encoded once. Returns the index document."""
    from flowcurate.formats import edit_shards as E
    from flowcurate.formats import shards as S
    from flowcurate.formats.files import write_atomic
    from flowcurate.models.autoencoder import Autoencoder
    from flowcurate.models.conditioning import record_parts
    from flowcurate.models.text_encoders import TextEncoders, quiet_hf_logging

    quiet_hf_logging()
    ae, te = Autoencoder.load(sd3), TextEncoders.load(sd3, t5_length=t5_length)
    out = Path(out)
    record = E.write_edit_record(out, *record_parts(sd3, ae, te, label=label))
    texts = sorted({t.instruction for t in items})
    encoded = te.encode(texts)
    enc_of = {text: {p: encoded[p][i] for p in S.PARTS} for i, text in enumerate(texts)}
    by_split: dict[str, list[dict]] = {"train": [], "val": []}
    for lo in range(0, len(items), batch):
        chunk = items[lo:lo + batch]
        pairs = [t.images(size) for t in chunk]
        src_mean, src_logvar = ae.encode([p[0] for p in pairs])
        mean, logvar = ae.encode([p[1] for p in pairs])
        for j, t in enumerate(chunk):
            key = f"{key_prefix}{lo + j:06d}"
            meta = {"instruction": t.instruction, "source": f"procedural:{key}", "width": size, "height": size,
                    "crop": [0, 0, size, size], "resolution": [size, size], "answer": t.answer}
            sample = E.encode_edit_sample(key, mean[j], logvar[j], src_mean[j], src_logvar[j],
                                          enc_of[t.instruction], meta, record.hash)
            by_split[S.split_of(key, val_fraction)].append(sample)
    counts = {}
    for split, samples in by_split.items():
        for i in range(0, len(samples), shard_size):
            name = S.shard_name(split, i // shard_size)
            write_atomic(out / "shards" / name, S.tar_bytes(samples[i:i + shard_size]))
            counts[name] = len(samples[i:i + shard_size])
    return E.write_edit_index(out / "shards", counts, record.hash)


# ------------------------------------------------------------------------------------------------------
# Raw edit data, as the public InstructPix2Pix data is published (Hugging Face Parquet)

# (width, height) of the rendered triplets: squares and both orientations, so crops are exercised
EDIT_DATA_SIZES = ((64, 64), (96, 64), (64, 80))
# planted cases -> what the curated manifest must say (status, or "rejected:<reason>")
EDIT_PLANTS = {"exact_copy": "duplicate", "reencoded_copy": "duplicate", "unchanged": "rejected:edit_unchanged",
               "no_source": "rejected:missing_image", "no_instruction": "rejected:missing_instruction",
               "size_mismatch": "rejected:edit_size_mismatch", "undecodable": "rejected:undecodable"}


def write_edit_data(out: Path, n: int = 64, seed: int = 0, files: int = 2) -> dict:
    """`n` procedural triplets plus one of each `EDIT_PLANTS` case as raw edit data:
    OUT/raw/part-NNNNN.parquet with the InstructPix2Pix columns (`original_prompt`, `original_image`,
    `edit_prompt`, `edited_prompt`, `edited_image`; images as Hugging Face image structs {bytes, path},
    PNG) and OUT/truth.json: per row (`file#row`, as the manifest's `source` ends) the instruction,
    the size, the answer and what curation must decide (`expect`: kept, duplicate or rejected:<reason>;
    a planted copy's `copy_of` names its original's row: of the two, one is kept and one is a duplicate).
    Rows are dealt round-robin over `files` files."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from flowcurate.models.tiny.procedural import render
    from flowcurate.models.tiny.sample_data import encode_image

    def _png(img) -> bytes:
        return encode_image(img, "png")

    rng = np.random.default_rng(seed)
    rows, truth = [], []

    def add(src, edited, instruction, expect, t: Triplet | None = None, plant: str | None = None, size=None,
            copy_of: int | None = None):
        rows.append({"original_prompt": None, "original_image": None if src is None else {"bytes": src, "path": None},
                     "edit_prompt": instruction, "edited_prompt": None,
                     "edited_image": None if edited is None else {"bytes": edited, "path": None}})
        truth.append({"instruction": instruction, "expect": expect, "plant": plant, "size": size,
                      "answer": t.answer if t is not None else None, "copy_of": copy_of})

    made: list = []
    while len(made) < n:
        t = random_triplet(rng)
        if not t.edited.shapes:  # removing the only shape leaves a blank image: every such edit would be
            continue  # a duplicate of the others on that background (dedup runs on the edited images)
        w, h = EDIT_DATA_SIZES[int(rng.integers(len(EDIT_DATA_SIZES)))]
        src, edited = render(t.source, w, h), render(t.edited, w, h)
        made.append((t, src, edited))
        add(_png(src), _png(edited), t.instruction, "kept", t, size=[w, h])
    t, src, edited = made[0]
    add(_png(src), _png(edited), t.instruction, EDIT_PLANTS["exact_copy"], t, "exact_copy", list(src.size), 0)
    t, src, edited = made[1]
    again = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in (encode_image(src, "jpg", 90), encode_image(edited, "jpg", 90))]
    add(_png(again[0]), _png(again[1]), t.instruction, EDIT_PLANTS["reencoded_copy"], t, "reencoded_copy",
        list(src.size), 1)
    t, src, _ = made[2]
    add(_png(src), _png(src), t.instruction, EDIT_PLANTS["unchanged"], t, "unchanged", list(src.size))
    t, _, edited = made[3]
    add(None, _png(edited), t.instruction, EDIT_PLANTS["no_source"], t, "no_source", list(edited.size))
    t, src, edited = made[4]
    add(_png(src), _png(edited), None, EDIT_PLANTS["no_instruction"], t, "no_instruction", list(src.size))
    t, src, edited = made[5]
    add(_png(src.resize((src.width + 16, src.height))), _png(edited), t.instruction, EDIT_PLANTS["size_mismatch"],
        t, "size_mismatch", list(edited.size))
    t, src, _ = made[6]
    add(_png(src), b"not an image", t.instruction, EDIT_PLANTS["undecodable"], t, "undecodable", list(src.size))

    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("original_prompt", pa.string()), ("original_image", image), ("edit_prompt", pa.string()),
                        ("edited_prompt", pa.string()), ("edited_image", image)])
    order = rng.permutation(len(rows))  # planted cases land among the others, in any file
    per_file: list[list[int]] = [[] for _ in range(files)]
    for rank, i in enumerate(order):
        per_file[rank % files].append(int(i))
    doc = {"n": len(rows), "rows": {}}
    where = {}
    for f, idx in enumerate(per_file):
        name = f"part-{f:05d}.parquet"
        pq.write_table(pa.Table.from_pylist([rows[i] for i in idx], schema=schema), out / "raw" / name,
                       row_group_size=16)
        where.update({i: f"{name}#{r}" for r, i in enumerate(idx)})
    for i, t in enumerate(truth):  # a copy names its original's row: one of the two is kept, which one
        # depends on the keep priority (pixels, then key), so the truth says the pair, not the winner
        doc["rows"][where[i]] = {**t, "copy_of": where[t["copy_of"]] if t["copy_of"] is not None else None}
    (out / "truth.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    return doc
