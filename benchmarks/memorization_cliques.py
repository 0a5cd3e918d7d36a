"""The memorization check's clique test at SD3's scale: K = 500 generations per prompt, T = 10.

`clique_test` (per-node branch and bound that stops at the first clique of T) against the exhaustive
reference it replaced (every maximal clique, Bron-Kerbosch), on random generation graphs: uniform edge
probabilities from sparse to dense, and a planted clique of copies in a sparse graph. Prints seconds per
prompt (one graph = one prompt; wall clock, and this process's CPU time, which a box shared with other
jobs inflates less), undecided generations and search nodes expanded; the exhaustive method runs in a
subprocess killed after --exhaustive-timeout seconds (wall clock), so its time is a lower bound where
it did not finish; the ratio is against the new method's wall time on the same graph.

    OPENBLAS_NUM_THREADS=1 python benchmarks/memorization_cliques.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (label, nodes, edge probability, planted clique size)
CASES = [
    ("uniform 0.3", 500, 0.3, 0),
    ("uniform 0.4 (largest clique ~T)", 500, 0.4, 0),
    ("uniform 0.5", 500, 0.5, 0),
    ("uniform 0.8", 500, 0.8, 0),
    ("uniform 0.95", 500, 0.95, 0),
    ("planted 60 in 0.05", 500, 0.05, 60),
]
SMALL = [("uniform 0.6 (largest clique ~T)", 60, 0.6, 0), ("uniform 0.9", 40, 0.9, 0), ("uniform 0.9", 50, 0.9, 0),
         ("uniform 0.9", 64, 0.9, 0)]


def graph(n: int, p: float, planted: int, seed: int) -> np.ndarray:
    """n generations of one prompt, joined with probability p; `planted` of them (random ones) all
    joined to each other: copies of one training image."""
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < p, 1)
    edges = upper | upper.T
    if planted:
        members = rng.choice(n, planted, replace=False)
        edges[np.ix_(members, members)] = True
        np.fill_diagonal(edges, False)
    return edges


def exhaustive(n: int, p: float, planted: int, seed: int, t: int, timeout: float) -> dict | None:
    """{"seconds", "memorized" (nodes in a clique of >= t)} from the exhaustive method in a fresh process
    (its imports not counted: the process starts the clock and its alarm after them), None if it ran
    past `timeout`."""
    cmd = [sys.executable, __file__, "--exhaustive-one", *map(str, (n, p, planted, seed, t, timeout))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    return None if out == "timeout" else json.loads(out)


def exhaustive_one(n: int, p: float, planted: int, seed: int, t: int, timeout: float) -> None:
    """The child process: prints the exhaustive method's result as JSON, or "timeout" after `timeout` s."""
    from flowcurate.trainer import cliques as C

    def give_up(*_):
        print("timeout", flush=True)
        os._exit(0)

    edges = graph(n, p, planted, seed)
    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    start = time.perf_counter()
    sizes = C._exhaustive_clique_sizes(edges)
    seconds = time.perf_counter() - start
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps({"seconds": seconds, "memorized": np.flatnonzero(sizes >= t).tolist()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="graphs per case (default 3)")
    ap.add_argument("--min-clique", type=int, default=None, help="T (default: the check's, 10)")
    ap.add_argument("--budget", type=int, default=None, help="search nodes per generation (default: the check's)")
    ap.add_argument("--exhaustive-timeout", type=float, default=20.0)
    ap.add_argument("--exhaustive-one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.exhaustive_one:
        n, p, planted, seed, t, timeout = args.exhaustive_one
        return exhaustive_one(int(n), float(p), int(planted), int(seed), int(t), float(timeout))

    from common import machine

    from flowcurate.trainer import cliques as C

    t = args.min_clique or C.MIN_CLIQUE
    budget = args.budget or C.CLIQUE_BUDGET
    print(f"# {machine()}")
    print(f"# T = {t}, budget {budget} search nodes per generation, {args.seeds} graphs per case; exhaustive "
          f"method killed after {args.exhaustive_timeout:g} s")
    print("| graph | nodes | s/prompt wall (mean / max) | CPU s (mean / max) | memorized | undecided | "
          "expanded (max) | exhaustive s/prompt | ratio | same answers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, n, p, planted in SMALL + CASES:
        secs, cpu, memorized, undecided, expanded, first = [], [], [], 0, [], None
        for seed in range(args.seeds):
            edges = graph(n, p, planted, seed)
            start, start_cpu = time.perf_counter(), time.process_time()
            a = C.clique_test(edges, t, budget)
            secs.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            memorized.append(int(a.memorized.sum()))
            undecided += int(a.undecided.sum())
            expanded.append(a.expanded)
            first = a if first is None else first
        old = exhaustive(n, p, planted, 0, t, args.exhaustive_timeout)
        old_s = f"> {args.exhaustive_timeout:g}" if old is None else f"{old['seconds']:.3f}"
        ratio = f"> {args.exhaustive_timeout / secs[0]:.0f}x" if old is None else f"{old['seconds'] / secs[0]:.0f}x"
        same = "n/a" if old is None else (
            "yes" if np.flatnonzero(first.memorized).tolist() == old["memorized"] else "NO")
        print(f"| {label} | {n} | {np.mean(secs):.3f} / {max(secs):.3f} | {np.mean(cpu):.3f} / {max(cpu):.3f} | "
              f"{'/'.join(map(str, memorized))} | "
              f"{undecided} | {max(expanded)} | {old_s} | {ratio} | {same} |", flush=True)


if __name__ == "__main__":
    main()
