"""Tiny models in exactly the on-disk layouts of the real ones, for tests and the demo.

    DIR/sd3/                   a complete diffusers StableDiffusion3Pipeline folder (flowcurate.models.tiny.sd3)
    DIR/sscd.torchscript.pt    the released SSCD models' interface, briefly trained (flowcurate.models.tiny.sscd)
    DIR/captioner/             a LLaVA-style VLM for AutoProcessor + AutoModelForImageTextToText
                               (flowcurate.models.tiny.captioner)
    DIR/tiny_report.json       version, seed, build times and quality numbers (AE PSNR, SSCD separation)

They are loaded through the same code that loads real checkpoints (`from_pretrained`, `torch.jit.load`).
Building is deterministic for a seed (fixed step counts, never time budgets) and happens once per
seed and builder source into `$FLOWCURATE_CACHE/tiny/v{VERSION}-seed{S}-{source hash}/` (default cache
`~/.cache/flowcurate`): under a
file lock, into a temporary folder that is renamed into place, so concurrent test workers and
launchers never see half a model.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from flowcurate.formats.config import TINY_SCHEME
from flowcurate.formats.files import cache_root

# Bump when the layout changes. Edits to the builders change `source_hash`, which names the cache
# folder, so a build never outlives the code that made it (the report records the hash too).
VERSION = 1
REPORT = "tiny_report.json"
ROLES = ("sd3", "sscd.torchscript.pt", "captioner")
_SOURCES = ("__init__.py", "sd3.py", "sscd.py", "captioner.py", "procedural.py", "../sscd.py")


@functools.cache
def source_hash() -> str:
    """sha256 over the builder modules' source: what the built weights are a function of (with the seed)."""
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_dir(seed: int = 0) -> Path:
    # the source hash is part of the name, so checkouts with different builder code (a branch, a
    # worktree, an older release) each keep their own build instead of replacing each other's
    return cache_root() / "tiny" / f"v{VERSION}-seed{seed}-{source_hash()}"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(out: Path, seed: int = 0, log=print) -> dict:
    """Build every tiny model into `out` (which must not exist yet); returns the report."""
    # Imported here: each builder pulls in transformers / diffusers, which the rest of `models` need not.
    from flowcurate.models.tiny.captioner import build_captioner
    from flowcurate.models.tiny.sd3 import build_sd3
    from flowcurate.models.tiny.sscd import build_sscd

    out.mkdir(parents=True)
    report: dict = {"version": VERSION, "seed": seed, "source_hash": source_hash()}
    for name, fn, target in (("sd3", build_sd3, out / "sd3"),
                             ("sscd", build_sscd, out / "sscd.torchscript.pt"),
                             ("captioner", build_captioner, out / "captioner")):
        t0 = time.perf_counter()
        log(f"[tiny-models] building {name} ...")
        part = fn(target, seed=seed)
        part["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"[tiny-models] {name}: " + ", ".join(f"{k}={v}" for k, v in part.items()))
        report[name] = part
    (out / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / REPORT).read_text()).get("source_hash") == source_hash()
    except (OSError, ValueError):
        return False


def ensure_tiny_models(seed: int = 0, log=print) -> Path:
    """The cached tiny models for `seed`, built once (under a lock, moved into place atomically)."""
    final = cache_dir(seed)
    if _is_current(final):
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        if _is_current(final):  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp / "m", seed=seed, log=log)
            if final.exists():  # incomplete, or its report names other code: replace it
                log(f"[tiny-models] replacing stale build {final}")
                shutil.rmtree(final)
            os.replace(tmp / "m", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_tiny_models(output: Path, seed: int = 0, log=print) -> Path:
    """`flowcurate tiny-models --output DIR`: copy the cached build for `seed` into `output`."""
    src = ensure_tiny_models(seed, log=log)
    output.mkdir(parents=True, exist_ok=True)
    for name in (*ROLES, REPORT):
        dst = output / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if (src / name).is_dir():
            shutil.copytree(src / name, dst)
        else:
            shutil.copy2(src / name, dst)
    return output


def resolve_tiny(location: str, seed: int = 0, log=print) -> str:
    """`tiny://NAME` -> absolute path of that role in the cached build (built once); anything else unchanged.

    The one place a `tiny://` location becomes a path. Commands call it (or `resolve_models`) at
    their entry, once they know which models they need; loaders and workers only ever see paths."""
    if not location.startswith(TINY_SCHEME):
        return location
    name = location[len(TINY_SCHEME):]
    if name not in ROLES:
        raise ValueError(f"{location!r}: unknown tiny model; known: {[TINY_SCHEME + r for r in ROLES]}")
    return str(ensure_tiny_models(seed, log=log) / name)


def resolve_models(cfg, roles: tuple[str, ...] | None = None, seed: int = 0, log=print):
    """A copy of `cfg` (a `flowcurate.formats.config.Config`) whose `[models]` locations named in
    `roles` (field names such as "sscd"; None: every location) went through `resolve_tiny`."""
    m = cfg.models
    names = [f.name for f in dataclasses.fields(m) if isinstance(getattr(m, f.name), str)]
    resolved = {n: resolve_tiny(getattr(m, n), seed, log) for n in names if roles is None or n in roles}
    return dataclasses.replace(cfg, models=dataclasses.replace(m, **resolved))
