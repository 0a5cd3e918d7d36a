"""Instruction editing on the tiny, checkable task: does a short `flowcurate train --edit`
fine-tune make `flowcurate edit` perform the instructed edit, measurably more often than the model it
started from?

1. procedural recolour triplets ("make the circle red", models/tiny/edit_triplets.py) written as
   editing shards with the real tiny AE and text encoders (32 px, T5 length 8);
2. `flowcurate train --edit` (in this process, one torch thread) from a fresh tiny MM-DiT widened to
   32 input channels, checkpoints every `--checkpoint-every` steps;
3. held-out triplets (another seed) edited with the sampler `flowcurate edit` runs (`edit_images`) by
   the starting model (step 0) and by each checkpoint's EMA weights; scored by `score_edit`: the mean
   hue inside the shape moves toward the target colour (`hue_toward_target`), and over the changed
   pixels the output is closer to the edited image than to the source (`closer_to_edit`);
   the AE's own reconstructions of source (copying it) and edited image are scored as references;
4. `flowcurate edit` (the command) once on a held-out image, and a picture: input, instruction, outputs.

    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/edit_bench.py --work /tmp/edit-bench \\
        --steps 1500 --picture benchmarks/edit_tiny.png

Prints one JSON line per evaluation and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_now, machine  # noqa: E402

from flowcurate.formats import shards as S  # noqa: E402
from flowcurate.models.autoencoder import Autoencoder, to_model_space  # noqa: E402
from flowcurate.models.text_encoders import TextEncoders  # noqa: E402
from flowcurate.models.tiny import edit_triplets as T  # noqa: E402
from flowcurate.models.tiny import ensure_tiny_models  # noqa: E402
from flowcurate.trainer import checkpoint as C  # noqa: E402
from flowcurate.trainer.edit import _load_step, edit_images  # noqa: E402

SIZE = 32
T5_LENGTH = 8


def write_config(path: Path, steps: int, every: int, batch: int, lr: float) -> Path:
    path.write_text(f"""[train]
model = "tiny"
batch_size = {batch}
lr = {lr}
warmup_steps = 50
max_steps = {steps}
ema_decay = 0.99
shift = 1.0
sample_steps = 8
checkpoint_every = {every}
keep_checkpoints = 100
sample_every = 0
log_every = 50
shuffle_buffer = 256
mixed_precision = false
seed = 0
""")
    return path


def score(model, ae, te, held, scales, steps: int) -> dict:
    src = np.stack([t.images(SIZE)[0] for t in held])
    outs = edit_images(model, ae, te, src, [t.instruction for t in held], list(range(len(held))), steps, 1.0, *scales)
    rows = [T.score_edit(t, o) for t, o in zip(held, outs)]
    return {"hue_toward_target": float(np.mean([r["hue_toward_target"] for r in rows])),
            "closer_to_edit": float(np.mean([r["closer_to_edit"] for r in rows])), "outputs": outs}


def picture(path: Path, held, columns: list[tuple[str, np.ndarray]], n: int = 6, zoom: int = 3) -> None:
    from PIL import Image, ImageDraw

    cell, label_w, head = SIZE * zoom, 150, 14
    img = Image.new("RGB", (label_w + len(columns) * (cell + 4), head + n * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for j, (name, _) in enumerate(columns):
        draw.text((label_w + j * (cell + 4), 1), name, fill=(0, 0, 0))
    for i in range(n):
        y = head + i * (cell + 4)
        draw.text((2, y + cell // 2 - 5), held[i].instruction, fill=(0, 0, 0))
        for j, (_, images) in enumerate(columns):
            tile = Image.fromarray(images[i]).resize((cell, cell), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + j * (cell + 4), y))
    img.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--train", type=int, default=2000, help="training triplets")
    ap.add_argument("--held-out", type=int, default=50)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--picture", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sd3 = str(ensure_tiny_models() / "sd3")
    results = {"machine": machine(), "load_start": load_now(), "args": {k: str(v) for k, v in vars(args).items()}}

    t0 = time.time()
    shards = work / "shards"
    if not (shards / "shards" / S.INDEX_JSON).exists():
        T.write_edit_shards(shards, T.triplets(args.train, 0, kinds=("recolor",)), sd3, SIZE, label="tiny://sd3",
                            val_fraction=0.02, t5_length=T5_LENGTH)
    results["write_shards_s"] = time.time() - t0

    from flowcurate.trainer.cli import main as trainer_main

    run = work / "run"
    cfg = write_config(work / "edit.toml", args.steps, args.checkpoint_every, args.batch, args.lr)
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    trainer_main(["train", "--edit", "--shards", str(shards), "--config", str(cfg), "--output", str(run),
                  "--device", "cpu"])
    results["train_s"] = time.time() - t0
    results["train_cpu_s"] = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
    results["load_after_train"] = load_now()
    print(json.dumps({k: results[k] for k in ("write_shards_s", "train_s", "train_cpu_s", "load_after_train")}),
          flush=True)

    ae, te = Autoencoder.load(sd3), TextEncoders.load(sd3, t5_length=T5_LENGTH)
    held = T.triplets(args.held_out, 12345, kinds=("recolor",))
    src = np.stack([t.images(SIZE)[0] for t in held])
    edited = np.stack([t.images(SIZE)[1] for t in held])

    def recon(images):
        mean, _ = ae.encode(list(images))
        return ae.decode(to_model_space(torch.from_numpy(mean), ae.scaling_factor, ae.shift_factor))

    refs = {"copy the source (AE reconstruction)": recon(src), "the edited image (AE reconstruction)": recon(edited)}
    results["references"] = {name: float(np.mean([T.score_edit(t, o)["hue_toward_target"] for t, o in zip(held, imgs)]))
                             for name, imgs in refs.items()}
    print(json.dumps(results["references"]), flush=True)

    from flowcurate.formats.config import load_config
    from flowcurate.trainer.edit import initial_models
    from flowcurate.trainer.train import TrainLaunch

    start, _ = initial_models(TrainLaunch(load_config(str(cfg)), str(shards), str(run)),
                              S.read_record(run / S.RECORD_JSON, task="edit"), (SIZE, SIZE), "cpu")
    models = [("step 0 (start)", start.eval())]
    models += [(p.name, _load_step(p, "ema", "cpu").eval()) for p in C.checkpoints(run)]
    scales_list = [(1.0, 1.0), (1.5, 3.0), (1.5, 7.5)]
    results["evaluations"] = []
    columns = [("input", src), ("target", edited)]
    for name, model in models:
        for scales in scales_list:
            t0 = time.time()
            r = score(model, ae, te, held, scales, args.sample_steps)
            row = {"model": name, "image_guidance": scales[0], "text_guidance": scales[1],
                   "hue_toward_target": r["hue_toward_target"], "closer_to_edit": r["closer_to_edit"],
                   "n": len(held), "seconds": time.time() - t0}
            results["evaluations"].append(row)
            print(json.dumps(row), flush=True)
            if scales == (1.5, 7.5) and (name.startswith("step 0") or name == models[-1][0]):
                columns.append(("start" if name.startswith("step 0") else name, r["outputs"]))
    results["load_end"] = load_now()

    # the command itself, once
    from PIL import Image

    Image.fromarray(src[0]).save(work / "in.png")
    cmd = [sys.executable, "-m", "flowcurate.cli", "edit", "--checkpoint", str(run), "--image", str(work / "in.png"),
           "--instruction", held[0].instruction, "--output", str(work / "edit-grid.png"), "--seeds", "3",
           "--image-guidance", "1.5", "--text-guidance", "3", "7.5", "--steps", str(args.sample_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    results["cli"] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "stdout": proc.stdout[-300:]}
    if args.picture:
        picture(args.picture, held, columns)
        results["picture"] = str(args.picture)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "evaluations"}, indent=2))


if __name__ == "__main__":
    main()
