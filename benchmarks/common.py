"""Shared helpers for benchmark scripts: the machine description printed with every result."""

from __future__ import annotations

import os
import platform
import resource


def machine() -> str:
    import torch

    try:
        import faiss

        faiss_threads = faiss.omp_get_max_threads()
    except ImportError:  # pragma: no cover
        faiss_threads = "n/a"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), faiss threads {faiss_threads}, "
            f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
