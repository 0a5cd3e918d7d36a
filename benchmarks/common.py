"""Shared helpers for benchmark scripts: the machine description printed with every result, process
memory from /proc/self/status, and a subprocess measured (wall, CPU, peak RSS, its process tree)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
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


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


def _tree_cpu(root: int, seen: dict) -> None:
    """Add the CPU ticks of `root` and its live descendants to `seen` (pid -> latest ticks)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, int] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(f[1]), []).append(int(d))
        stats[int(d)] = int(f[11]) + int(f[12])  # utime + stime (ticks)
    todo = [root]
    while todo:
        p = todo.pop()
        if p in stats:
            seen[p] = max(seen.get(p, 0), stats[p])
        todo += children.get(p, [])


def run_measured(cmd: list[str], env: dict, log_path) -> dict:
    """Run cmd, its output into log_path: wall seconds; CPU seconds and peak RSS (MB) of the process and
    the descendants it waited for (os.wait4's rusage); CPU seconds of its whole process tree sampled from
    /proc every 0.2 s (also workers never waited for) and the processes seen; load before/after."""
    load0, seen, t0 = load_now(), {}, time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                _tree_cpu(proc.pid, seen)
                stop.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        th.join()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "cpu_s_rusage": ru.ru_utime + ru.ru_stime,
            "cpu_s_proc": sum(seen.values()) / os.sysconf("SC_CLK_TCK"), "peak_rss_mb": ru.ru_maxrss / 1024,
            "processes": len(seen), "load_before": load0, "load_after": load_now()}
