"""The trainer's subcommands as argparse parsers: `train` (and `train --edit`), `sample`, `edit`, `memorization`.

Building these parsers imports nothing heavy (no torch), so `flowcurate --help` and each `--help` are
instant; a command's module is imported only when the command runs. `python -m flowcurate.trainer`
runs them alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flowcurate.formats.args import ArgumentParser


def _lazy(module: str):
    """The command's `run_cli(args)`, imported when the command runs."""
    def run(args) -> int:
        return importlib.import_module(module).run_cli(args)
    return run


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train the MM-DiT on curated shards (one process, or torchrun DDP or FSDP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the rectified-flow MM-DiT on curated shards: one process, or torchrun for DDP or FSDP.",
        epilog="examples:\n"
               "  flowcurate train --shards out/ --config tiny --output run/ --max-steps 400\n"
               "  flowcurate train --shards 'out/shards/train-{000000..000031}.tar' --config sd3 --output run/\n"
               "  torchrun --nproc_per_node 8 -m flowcurate.trainer train --shards out/ --config sd3 --output run/\n"
               "  torchrun --nproc_per_node 8 -m flowcurate.trainer train --shards out/ --config sd3 --output run/ \\\n"
               "      --parallel fsdp --fsdp-mixed-precision bf16   # model, EMA, optimizer sharded over 8 GPUs\n"
               "  flowcurate train --shards out/ --config sd3 --output run/ \\\n"
               "      --init-from stabilityai/stable-diffusion-3-medium-diffusers --init-subfolder transformer\n"
               "  flowcurate train --shards out512/ --config sd3 --output run512/ --init-from run256/   # next stage\n"
               "  flowcurate train --shards out/ --config tiny --output run/ --report-to tensorboard\n"
               "  flowcurate train --shards out/ --config sd3 --output run/ --batch-size 1024 --grad-accum 8\n"
               "  flowcurate train --edit --shards edits/ --config tiny --output edit-run/ --init-from run/   # editing\n"
               "Rerun the same command on an existing run folder to resume from its latest checkpoint: the\n"
               "loader reopens each worker's shard at the saved byte offset (no replay of earlier batches).\n"
               "A resume that changes batch size, ranks, --workers, --split, --shuffle-buffer, seed or\n"
               "--grad-accum is refused (exit 2); to keep the weights and restart the data order at the\n"
               "start of the run's epoch:\n"
               "  flowcurate train --shards out/ --config tiny --output run/ --batch-size 16 --accept-data-change")
    p.add_argument("--shards", required=True, help="pipeline output folder, shards folder, brace spec, glob or URLs")
    p.add_argument("--val-shards", help="validation shards (default: the val split of an output folder)")
    p.add_argument("--conditioning", help="conditioning.json (default: found beside the shards)")
    p.add_argument("--config", default="sd3", help="preset name (sd3, the default; tiny) or TOML path")
    p.add_argument("--output", required=True, help="run folder (resumed when it has checkpoints)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--sample-every", type=int, help="steps between validation loss + sample grid (0: at the end)")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--grad-accum", type=int, metavar="N",
                   help="gradient accumulation: each rank's batch runs as N micro-batches of batch/N (less "
                        "memory, the same gradient; default: the config's, 1), e.g. --batch-size 256 "
                        "--grad-accum 4")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--init-from", help="start from a flowcurate run or step folder (weights and EMA; fresh optimizer "
                                       "and data position; positions moved to the new resolution), a diffusers "
                                       "SD3Transformer2DModel folder, or a hub id with --init-subfolder")
    p.add_argument("--init-subfolder", help="subfolder of a diffusers --init-from (default: transformer, unless "
                                            "the folder itself holds config.json; '' for a transformer repo)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, help="samples in each worker's shuffle buffer (default: the "
                                                      "config's, 256)")
    p.add_argument("--split", choices=("auto", "global", "shards", "resampled"),
                   help="how ranks share the shards (default: the config's, auto; trainer/data.py)")
    p.add_argument("--accept-data-change", action="store_true",
                   help="resume although a data-order setting (batch size, ranks, workers, split, shuffle buffer, "
                        "seed, grad accum) differs from the run's: weights and optimizer are kept, the data order restarts "
                        "at the start of the epoch the run was in (its samples so far are seen again)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp (default; a whole model on every rank) or fsdp (parameters, "
                        "gradients, optimizer state and EMA sharded over the ranks; checkpoints add a sharded/ "
                        "folder, and the whole model/EMA safetensors are still written)")
    p.add_argument("--fsdp-mixed-precision", choices=("bf16",),
                   help="with --parallel fsdp: bf16 parameters in forward and backward, gradients reduced in "
                        "fp32 into fp32 shards (default: fp32 throughout)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster GPU steps)")
    p.add_argument("--bf16-on-cpu", action="store_true",
                   help="bf16 autocast on the CPU too when the config's mixed_precision is on (by default only "
                        "CUDA autocasts): to check bf16 against fp32 without a GPU; slower than fp32 on most CPUs")
    p.add_argument("--report-to", action="append", metavar="TRACKER",
                   help="also log to tensorboard (RUN/tensorboard/) or wandb (RUN/wandb/, offline unless "
                        "WANDB_API_KEY or WANDB_MODE is set); repeatable or comma-separated; none (default)")
    edit = p.add_argument_group("instruction editing (InstructPix2Pix; trainer/edit.py)")
    edit.add_argument("--edit", action="store_true",
                      help="train an editing model on editing shards: the source latent beside the noisy one "
                           "on channels (32 in, 16 out; the new input weights start at zero, so --init-from a "
                           "text-to-image run or diffusers transformer starts as exactly that model), "
                           "conditioned on the instruction; one process")
    edit.add_argument("--image-drop-prob", type=float, default=0.1,
                      help="with --edit: probability that a sample's source latent is zeroed (default 0.1)")
    edit.add_argument("--instruction-drop-prob", type=float, default=0.1,
                      help="with --edit: probability that a sample's instruction is zeroed, independently of "
                           "the image drop (default 0.1)")
    p.set_defaults(func=_train)
    return p


def _train(args) -> int:
    """`train`, or its editing mode with --edit (a module of its own, trainer/edit.py)."""
    if args.edit:
        return importlib.import_module("flowcurate.trainer.edit").run_train_cli(args)
    return importlib.import_module("flowcurate.trainer.train").run_cli(args)


def add_edit_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "edit", help="edit an image by an instruction with a `train --edit` run (InstructPix2Pix guidance)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit an image as an instruction says, with an editing run (flowcurate train --edit): Euler "
                    "sampling with InstructPix2Pix's two-scale classifier-free guidance on velocities, "
                    "v = v(0,0) + s_I (v(I,0) - v(0,0)) + s_T (v(I,T) - v(I,0)). The image is scaled and "
                    "centre-cropped to the run's resolution, encoded with the record's autoencoder; the "
                    "instruction with its text encoders.",
        epilog="examples:\n"
               "  flowcurate edit --checkpoint run/ --image in.png --instruction 'make the circle red' "
               "--output out.png\n"
               "  flowcurate edit --checkpoint run/ --image in.png --instruction 'remove the triangle' \\\n"
               "      --image-guidance 1.5 --text-guidance 7.5 --output out.png\n"
               "  flowcurate edit --checkpoint run/ --image in.png --instruction 'move the square left' \\\n"
               "      --seeds 4 --image-guidance 1 1.5 2 --text-guidance 3 7.5 --output grid.png   # a grid\n"
               "One seed and one pair of scales write the edited image; otherwise a grid with a row per\n"
               "(image, text) guidance pair: the input, then one output per seed (out.json says which).")
    p.add_argument("--checkpoint", required=True, help="editing run folder (its latest step) or a step folder")
    p.add_argument("--image", required=True, help="the image to edit")
    p.add_argument("--instruction", required=True, help="what to do, e.g. 'make the circle red'")
    p.add_argument("--output", required=True, help="PNG to write (a JSON beside it lists the settings)")
    p.add_argument("--image-guidance", type=float, nargs="+", default=[1.5], metavar="S_I",
                   help="image guidance scale(s) s_I (default 1.5; several make a grid)")
    p.add_argument("--text-guidance", type=float, nargs="+", default=[7.5], metavar="S_T",
                   help="text guidance scale(s) s_T (default 7.5; several make a grid)")
    p.add_argument("--seeds", type=int, default=1, help="outputs per guidance pair (seeds 0..N-1)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="working size (default: the run's)")
    p.add_argument("--steps", type=int, help="Euler steps (default: the run's sample_steps)")
    p.add_argument("--shift", type=float, help="timestep shift (default: the run's)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--no-verify", action="store_true", help="skip the content-hash check of AE and encoders")
    p.set_defaults(func=_lazy_edit)
    return p


def _lazy_edit(args) -> int:
    return importlib.import_module("flowcurate.trainer.edit").run_edit_cli(args)


def add_sample_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample", help="generate an image grid from a trained run (EMA weights)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with a trained MM-DiT; prompts are encoded with the text encoders "
                    "named in the run's conditioning record and decoded with its autoencoder.",
        epilog="examples:\n  flowcurate sample --checkpoint run/ --prompt 'a red circle' --output grid.png\n"
               "  flowcurate sample --checkpoint run/checkpoints/step-000400 --prompt 'a' --prompt 'b' \\\n"
               "      --seeds 4 --cfg 3 --steps 28 --output grid.png")
    p.add_argument("--checkpoint", required=True, help="run folder (its latest step) or a step folder")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); default: the record's validation prompts")
    p.add_argument("--output", required=True, help="PNG grid to write (a JSON beside it lists prompts and seeds)")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the run's)")
    p.add_argument("--steps", type=int, help="Euler steps (default: the run's sample_steps)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's)")
    p.add_argument("--shift", type=float, help="timestep shift (default: the run's)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--no-verify", action="store_true", help="skip the content-hash check of AE and encoders")
    p.set_defaults(func=_lazy("flowcurate.trainer.sample"))
    return p


def add_memorization_parser(sub) -> argparse.ArgumentParser:
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
    p.add_argument("--threshold", type=float, default=0.5, help="SSCD cosine above which a generation is "
                                                                      "flagged (default 0.5)")
    p.add_argument("--eps", type=float, default=0.15, help="tiled-l2 edge threshold (default 0.15)")
    p.add_argument("--min-clique", type=int, default=10, help="clique size T that marks memorization "
                                                                       "(default 10)")
    p.add_argument("--clique-budget", type=int, default=20_000,
                   help="search nodes per generation before its clique answer is reported undecided "
                        "(default 20000)")
    p.add_argument("--background-queries", type=int, default=10_000,
                   help="training images whose top-1 training neighbour makes the background (default 10000)")
    p.add_argument("--max-pairs", type=int, default=30, help="flagged pairs shown in pairs.png (default 30)")
    p.add_argument("--batch-size", type=int, default=32, help="generations per forward batch")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--sscd", help="SSCD model to use instead of the one stats.json names (same weights!)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--no-verify", action="store_true", help="skip the content-hash check of AE and encoders")
    p.set_defaults(func=_lazy("flowcurate.trainer.memorization"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m flowcurate.trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_edit_parser(sub)
    add_memorization_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
