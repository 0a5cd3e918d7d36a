"""Shared fixtures. Nothing here touches the network: HF_HUB_OFFLINE is forced on."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """The cached tiny models (seed 0): built once per machine under a lock, shared by xdist workers."""
    from models.tiny import ensure_tiny_models

    return ensure_tiny_models(seed=0)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
