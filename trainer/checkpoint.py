"""Checkpoints: `RUN/checkpoints/step-NNNNNN/` with model.safetensors, ema.safetensors,
optimizer.safetensors and state.json (step, optimizer groups, and what the trainer passes: config,
launch, data order, data position, model config; trainer/README.md lists them). The training noise
is drawn from generators seeded by (seed, step), so there is no RNG state to carry.

Written into a temporary folder and renamed, so a killed run never leaves a half checkpoint; the last
K are kept. Tensors only go through safetensors and JSON; nothing is unpickled.

An FSDP run's step folder has no optimizer.safetensors but `sharded/`: model, EMA and optimizer as a
torch.distributed.checkpoint written by every rank (trainer/parallel.py). Only a resume of that run
reads it (DCP's own metadata file is a pickle); model.safetensors and ema.safetensors are whole, as
in every other run, so `sample`, `memorization`, `export` and `--init-from` read them unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowcurate.formats.files import readable_mode

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE = "state.json"


def step_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:06d}"


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def resolve(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a step folder -> the step folder."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    found = latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint folder (no {STATE}) nor a run with checkpoints")
    return found


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    readable_mode(path)  # save_file makes 0600 files whatever the umask: a team could not read the run


def save(run: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
         state: dict, keep: int = 3) -> Path:
    tmp = stage(run, step)
    tensors, meta = _optimizer_tensors(opt)
    _save_tensors(tensors, tmp / "optimizer.safetensors")
    return commit(run, step, tmp, model.state_dict(), ema.state_dict(), {**state, "optimizer": meta}, keep)


def stage(run: Path, step: int) -> Path:
    """A fresh temporary folder beside the step folder, for `commit` to rename into place. Named by this
    process (two writers never share one); FSDP ranks all write into rank 0's (trainer/parallel.py)."""
    final = step_dir(run, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(run: Path, step: int, tmp: Path, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
           state: dict, keep: int = 3) -> Path:
    """Write the weights and state.json into the staged `tmp`, rename it to the step folder, keep the
    last `keep` checkpoints."""
    final = step_dir(run, step)
    _save_tensors(model, tmp / "model.safetensors")
    _save_tensors(ema, tmp / "ema.safetensors")
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE).read_text())


def load_weights(folder: Path, which: str = "ema", device: str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / f"{which}.safetensors", device=device)


def load(folder: Path, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
         device: str = "cpu") -> dict:
    model.load_state_dict(load_weights(folder, "model", device))
    ema.load_state_dict(load_weights(folder, "ema", device))
    state = read_state(folder)
    _load_optimizer(opt, load_file(Path(folder) / "optimizer.safetensors", device=device), state["optimizer"])
    return state
