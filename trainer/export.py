"""`flowcurate export`: a trained run as diffusers folders, so that the model can leave flowcurate.

A checkpoint holds our MM-DiT in our own names (`models/mmdit.py`), which only flowcurate reads. This
writes what the rest of the ecosystem loads:

    DIR/                        (default) an `SD3Transformer2DModel` folder: config.json +
                                diffusion_pytorch_model.safetensors, for `SD3Transformer2DModel.from_pretrained`
    DIR/ with --pipeline        a whole `StableDiffusion3Pipeline` folder: transformer/ (ours), vae/,
                                text_encoder{,_2,_3}/, tokenizer{,_2,_3}/ copied from the models the run's
                                conditioning record names (content hashes checked: the latents and text
                                encodings were made with exactly these), scheduler/ (a
                                FlowMatchEulerDiscreteScheduler with the run's shift), model_index.json
    DIR/flowcurate_export.json  where it came from (checkpoint, step, weights, record hash) and the run's
                                sampling settings, which diffusers folders have no place for

The weights are renamed and split with `models/mmdit_diffusers.py` (parity with diffusers tested at
1e-6); the config is `diffusers_config`, so a fresh `SD3Transformer2DModel` from config.json is our
network (position table, patch size, widths, QK-norm) and the weights are exactly ours, in the
checkpoint's dtype. EMA weights by default: `flowcurate sample` and the training grids use them.

The folder is written beside DIR under a temporary name and renamed at the end, so a failed export
leaves no half folder; an existing non-empty DIR is refused rather than mixed with.

This module is imported when the parser is built (`flowcurate --help`), so torch, diffusers and the
checkpoint code are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

EXPORT_JSON = "flowcurate_export.json"
# (record role, pipeline folder of its weights, pipeline folder of its tokenizer)
PIPELINE_PARTS = (("autoencoder", "vae", None), ("clip_l", "text_encoder", "tokenizer"),
                  ("clip_g", "text_encoder_2", "tokenizer_2"), ("t5", "text_encoder_3", "tokenizer_3"))


class ExportError(RuntimeError):
    """An export that cannot be made as asked (no checkpoint there, output in the way, a model that
    diffusers cannot describe); the command prints it and exits 2."""


def add_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="write a trained run as a diffusers SD3Transformer2DModel (or whole pipeline) folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a checkpoint of a trained run to the diffusers format: an SD3Transformer2DModel "
                    "folder (config.json + diffusion_pytorch_model.safetensors), or with --pipeline a whole "
                    "StableDiffusion3Pipeline folder with the autoencoder, text encoders and tokenizers the "
                    "run's latents and encodings were made with and a FlowMatchEulerDiscreteScheduler with "
                    "the run's shift. Exports the EMA weights by default, as samples use them.",
        epilog="examples:\n"
               "  flowcurate export run/ --output sd3-transformer/\n"
               "  flowcurate export run/checkpoints/step-004000 --output sd3-pipeline/ --pipeline\n"
               "then, in Python:\n"
               "  SD3Transformer2DModel.from_pretrained('sd3-transformer/')\n"
               "  StableDiffusion3Pipeline.from_pretrained('sd3-pipeline/')(prompt, max_sequence_length=77)\n"
               "flowcurate_export.json in the folder names the checkpoint and the run's sampling settings\n"
               "(steps, guidance scale, T5 length); pass them to the pipeline to sample as the run did.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder (its latest step) or a step folder")
    p.add_argument("--output", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="export the EMA weights (default: what `flowcurate sample` uses); --no-ema: the "
                        "raw training weights")
    p.add_argument("--pipeline", action="store_true",
                   help="a whole StableDiffusion3Pipeline folder, transformer in transformer/")
    p.add_argument("--no-verify", action="store_true",
                   help="with --pipeline: copy the AE and text encoders without checking their content hashes")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    from flowcurate.trainer.sample import ModelMismatch

    try:
        export(args.checkpoint, args.output, weights="ema" if args.ema else "model", pipeline=args.pipeline,
               verify=not args.no_verify)
    except (ExportError, ModelMismatch) as e:
        print(f"flowcurate export: {e}", file=sys.stderr)
        return 2
    return 0


def export(checkpoint: str | Path, output: str | Path, weights: str = "ema", pipeline: bool = False,
           verify: bool = True, log=print) -> Path:
    """Write `checkpoint` (a run folder: its latest step; or a step folder) to `output` as a diffusers
    SD3Transformer2DModel folder, or a StableDiffusion3Pipeline folder with `pipeline`. Returns `output`."""
    from flowcurate.formats import shards as S
    from flowcurate.trainer import checkpoint as C

    if not Path(checkpoint).exists():
        raise ExportError(f"{checkpoint}: no such run or checkpoint folder")
    try:
        step = C.resolve(checkpoint)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"{output} exists and is not an empty folder: pass a new --output")
    state = C.read_state(step)
    record_path = step.parent.parent / S.RECORD_JSON
    record = S.read_record(record_path) if record_path.is_file() else None
    if pipeline and record is None:
        raise ExportError(f"{record_path} is missing: --pipeline takes the AE and text encoders it names")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_transformer(step, tmp / "transformer" if pipeline else tmp, weights)
        if pipeline:
            write_pipeline_parts(record, state, tmp, verify)
        (tmp / EXPORT_JSON).write_text(json.dumps(provenance(step, state, record, weights, pipeline), indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        output.rmdir()  # empty (checked above); os.replace cannot put a folder over a folder
    os.replace(tmp, output)
    what = "StableDiffusion3Pipeline" if pipeline else "SD3Transformer2DModel"
    log(f"wrote {output} (a diffusers {what}; {weights} weights of {step})")
    return output


def transformer_from_checkpoint(step: Path, weights: str = "ema"):
    """A diffusers `SD3Transformer2DModel` holding the checkpoint's `weights` ("ema" or "model").

    Both networks are built on the meta device (no initialisation work) and take the loaded tensors as
    they are: renamed ones are shared, only the q/k/v splits and (shift, scale) swaps are new, about a
    sixth of the weights. An export costs ~1.2 copies of the model in memory rather than the three
    that `load_model` + `to_diffusers` would hold, which matters for the 8B sd3.5-large size."""
    import torch
    from diffusers import SD3Transformer2DModel

    from flowcurate.models.mmdit import MMDiT, MMDiTConfig
    from flowcurate.models.mmdit_diffusers import diffusers_config, to_diffusers_state_dict
    from flowcurate.trainer import checkpoint as C

    config = MMDiTConfig(**C.read_state(step)["model_config"])
    try:
        kwargs = diffusers_config(config)
    except ValueError as e:
        raise ExportError(f"{step}: this MM-DiT has no diffusers equivalent: {e}") from None
    ours = MMDiT(config, device="meta")
    ours.load_state_dict(C.load_weights(step, weights), assign=True)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**kwargs)
    transformer.load_state_dict(to_diffusers_state_dict(ours), assign=True)
    return transformer.eval()


def write_transformer(step: Path, folder: Path, weights: str) -> None:
    """`SD3Transformer2DModel.save_pretrained(folder)` of the checkpoint (safetensors, sharded as
    diffusers shards big models), files readable by the team like the run's own."""
    from flowcurate.formats.files import readable_mode

    transformer_from_checkpoint(step, weights).save_pretrained(folder, safe_serialization=True)
    for f in folder.glob("*.safetensors"):
        readable_mode(f)  # safetensors writes 0600 whatever the umask


def _local_root(source: str, revision: str | None, folders: list[str]) -> Path:
    """The folder that holds `folders` of a model source: the path itself, or its hub snapshot
    (from the cache when HF_HUB_OFFLINE=1, else downloaded)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", *(f"{f}/*" for f in folders)]
    return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))


def _copy_folder(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise ExportError(f"{src}: no such folder (the conditioning record names it)")
    # copyfile, not copy2: files get the umask's mode (tiny models and hub blobs can be 0600) and
    # hub snapshots' symlinks become the files they point to
    shutil.copytree(src, dst, copy_function=shutil.copyfile)


def _index_entry(root: Path, folder: str) -> list:
    """[library, class] of `folder` in the source's model_index.json (how diffusers loads that part)."""
    index = root / "model_index.json"
    if not index.is_file():
        raise ExportError(f"{root}: no model_index.json, so the class of its {folder}/ is unknown "
                          "(--pipeline copies parts of a diffusers SD3 folder)")
    entry = json.loads(index.read_text()).get(folder)
    if not entry or entry[0] is None:
        raise ExportError(f"{index} has no entry for {folder}/")
    return list(entry)


def write_pipeline_parts(record, state: dict, folder: Path, verify: bool) -> None:
    """Everything of a StableDiffusion3Pipeline folder but transformer/: the record's AE, text encoders
    and tokenizers copied byte for byte (their content hashes checked first unless `verify` is off),
    a scheduler with the run's shift, and model_index.json."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowcurate.trainer.sample import model_paths, record_entry, verify_weights

    paths = model_paths(record)
    index: dict = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
                   "feature_extractor": [None, None], "image_encoder": [None, None],
                   "transformer": ["diffusers", "SD3Transformer2DModel"],
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    for role, weights_folder, tokenizer_folder in PIPELINE_PARTS:
        entry = record_entry(record, role)
        theirs = [entry["subfolder"], *([entry["tokenizer"]] if tokenizer_folder else [])]
        root = _local_root(paths[role], entry.get("revision"), theirs)
        if verify:
            verify_weights(str(root), entry, role)
        for src, dst in zip(theirs, (weights_folder, tokenizer_folder)):
            _copy_folder(root / src, folder / dst)
            index[dst] = _index_entry(root, src)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=state["config"]["train"]["shift"]) \
        .save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def provenance(step: Path, state: dict, record, weights: str, pipeline: bool) -> dict:
    """flowcurate_export.json: the checkpoint exported, and how the run sampled (diffusers' pipeline
    call takes these as arguments: num_inference_steps, guidance_scale, max_sequence_length)."""
    train = state["config"]["train"]
    return {
        "checkpoint": str(step), "step": state["step"], "weights": weights,
        "format": "StableDiffusion3Pipeline" if pipeline else "SD3Transformer2DModel",
        "conditioning": state.get("conditioning"), "model_config": state["model_config"],
        "sampling": {"num_inference_steps": train["sample_steps"], "guidance_scale": train["cfg_scale"],
                     "shift": train["shift"],
                     "max_sequence_length": record.json["context"]["t5_length"] if record else None,
                     "height_width": state.get("sample_size")},
    }
