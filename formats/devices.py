"""Which device a pipeline worker loads its models on.

`device = "auto"` on a machine with several GPUs spreads the workers: each worker process takes the
next free index of its run on this machine (a counter file under a lock) and loads on
`cuda:<index % GPUs>`, so the 8 workers of `--direct_num_workers 8` on an 8-GPU machine use one GPU
each. A named device ("cpu", "cuda", "cuda:3") is used as given; under torchrun (LOCAL_RANK set) the
rank's GPU is used. Workers of one run share the counter through FLOWCURATE_RUN_TOKEN, which the
launcher sets before the pipeline starts and worker processes inherit.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

TOKEN_ENV = "FLOWCURATE_RUN_TOKEN"
_claimed: dict[tuple[int, str], int] = {}  # (pid, counter folder) -> index: fork-safe, once per process


def counter_folder() -> Path:
    """Where this run's workers count themselves (one folder per run token on this machine)."""
    return Path(tempfile.gettempdir()) / f"flowcurate-workers-{os.environ.get(TOKEN_ENV, 'shared')}"


def claim_worker_index(folder: str | Path | None = None) -> int:
    """This process's index among the processes that claimed one in `folder`: 0, 1, 2, ... in the
    order of their first call; every later call in the same process returns the same number."""
    folder = Path(folder) if folder is not None else counter_folder()
    key = (os.getpid(), str(folder))
    if key not in _claimed:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "counter", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0)
            text = f.read().strip()
            index = int(text) if text else 0
            f.seek(0)
            f.truncate()
            f.write(str(index + 1))
        _claimed[key] = index
    return _claimed[key]


def worker_device(device: str = "auto", gpus: int | None = None, folder: str | Path | None = None) -> str:
    """A config's device resolved on the worker that loads the model. `gpus`: the visible GPU count
    (None: ask torch). "auto" -> "cpu" without a GPU, "cuda" with one, "cuda:<k>" round-robin by
    worker index (or LOCAL_RANK) with several."""
    if device != "auto":
        return device
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return "cpu"
    if gpus == 1:
        return "cuda"
    local_rank = os.environ.get("LOCAL_RANK")
    index = int(local_rank) if local_rank is not None else claim_worker_index(folder)
    return f"cuda:{index % gpus}"
