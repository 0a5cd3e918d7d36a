"""Shared fixtures. Nothing here touches the network: HF_HUB_OFFLINE is forced on."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist, split the cores between the workers for torch's intra-op threads: `make test`
    runs 2 workers on 2 cores, and two torch processes with 2 threads each spin-wait against each other
    (6x slower: BENCHMARKS.md, "make test"). Outside xdist torch keeps every core (docs/architecture.md,
    "Measuring"); OMP_NUM_THREADS is left alone (subprocesses and FAISS keep their defaults)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def write_tar():
    """write_tar(path, [(member name, bytes), ...]): a plain tar with the names exactly as given
    (unsanitised, e.g. "../../etc/passwd.jpg"), for the readers of untrusted archives."""
    import io
    import tarfile

    def write(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    return write


@pytest.fixture(scope="session")
def tiny_models():
    """The cached tiny models (seed 0): built once per machine under a lock, shared by xdist workers."""
    from flowcurate.models.tiny import ensure_tiny_models

    return ensure_tiny_models(seed=0)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _make_golden():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_golden", Path(__file__).parent / "data" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOLDEN = __import__("pathlib").Path(__file__).parent / "data" / "golden"


@pytest.fixture(scope="session")
def golden():
    """The committed golden curated-shard fixture (format only: its content hashes pin the tiny models of
    the machine that wrote it, which another CPU may build with different low bits)."""
    return GOLDEN


@pytest.fixture(scope="session")
def fresh_shards(tiny_models, tmp_path_factory):
    """Shards in the golden layout made now from this machine's tiny models (8 samples, two 48x64),
    so the record's content hashes match the models `sample` loads."""
    out = tmp_path_factory.mktemp("fresh") / "out"
    _make_golden().main(out)
    return out


@pytest.fixture(scope="session")
def four_shards(tiny_models, tmp_path_factory):
    """Four 32x32 training samples (4x4 latents) for the overfit test."""
    out = tmp_path_factory.mktemp("four") / "out"
    _make_golden().main(out, n=4, odd=(), val_fraction=0.0, size=32)
    return out
