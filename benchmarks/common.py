"""Shared helpers for benchmark scripts: the machine description printed with every result, and
process memory from /proc/self/status."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time


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


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (RssAnon, VmHWM, ...)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


class AnonPeak:
    """Peak RssAnon since the last reset(), sampled by a daemon thread (MB)."""

    def __init__(self, every: float = 0.02):
        self.peak = 0
        threading.Thread(target=self._run, args=(every,), daemon=True).start()

    def _run(self, every):
        while True:
            self.peak = max(self.peak, status_kb("RssAnon"))
            time.sleep(every)

    def reset(self) -> None:
        self.peak = status_kb("RssAnon")

    def mb(self) -> float:
        self.peak = max(self.peak, status_kb("RssAnon"))
        return self.peak / 1024
