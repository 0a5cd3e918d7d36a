"""A checkpoint is readable by the team that shares the run folder: files get the umask's mode
(0644 under 022), although safetensors' save_file creates 0600 files."""

import os

import torch

from flowcurate.trainer import checkpoint as C


def test_checkpoint_files_follow_the_umask(tmp_path):
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    old = os.umask(0o022)
    try:
        folder = C.save(tmp_path / "run", 1, model, ema, opt, {"note": "x"})
    finally:
        os.umask(old)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "ema.safetensors", "optimizer.safetensors"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    state = C.load(folder, torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.optim.AdamW(model.parameters()))
    assert state["step"] == 1 and state["note"] == "x"


def test_atomic_writes_follow_the_umask(tmp_path):
    """dedup's dedup.parquet and summary.json, memorization's report and the shard index go through
    write_atomic, whose temporary file mkstemp creates 0600."""
    from flowcurate.formats.files import write_atomic

    old = os.umask(0o022)
    try:
        a = write_atomic(tmp_path / "a" / "summary.json", b"{}")
        b = write_atomic(tmp_path / "b.parquet", lambda name: open(name, "wb").close())
    finally:
        os.umask(old)
    assert oct(a.stat().st_mode & 0o777) == oct(b.stat().st_mode & 0o777) == "0o644"
