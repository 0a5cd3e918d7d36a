"""Progress of a running pipeline, reported by the stages themselves.

Beam's in-process runner reports no metrics until the run ends, so each stage counts what it did
(`Progress.add`) into Beam counters (namespace `flowcurate`, names `<stage>/<what>`: on Dataflow they
show in the job's page while it runs) and into this process's tally, which a daemon thread logs every
`INTERVAL` seconds while anything moves:

    pass 1 [pid 4711]: files 12, inputs 1,536 (128/s), valid 1,490, rejected 46, embedded 1,490

With several worker processes each logs its own line (Beam forwards worker logs to the launcher).
`busy` accumulates the seconds a stage spent working, for the closing table of `flowcurate run`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

import apache_beam as beam

NAMESPACE = "flowcurate"
INTERVAL = 10.0
log = logging.getLogger("flowcurate.progress")


class Progress:
    _stages: dict[str, Progress] = {}
    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    def __init__(self, stage: str, fields: Iterable[str]):
        self.stage, self.fields = stage, tuple(fields)
        self.counts = dict.fromkeys(self.fields, 0)
        self.busy = 0.0
        self.started = time.monotonic()
        self._counters = {f: beam.metrics.Metrics.counter(NAMESPACE, f"{stage}/{f}") for f in self.fields}
        self._busy_ms = beam.metrics.Metrics.counter(NAMESPACE, f"{stage}/busy_ms")
        self._logged: tuple = ()

    @classmethod
    def get(cls, stage: str, fields: Iterable[str]) -> Progress:
        """The process-wide tally of `stage` (created on first use; starts the reporting thread)."""
        with cls._lock:
            if stage not in cls._stages:
                cls._stages[stage] = Progress(stage, fields)
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._report_forever, name="flowcurate-progress", daemon=True)
                cls._thread.start()
            return cls._stages[stage]

    def add(self, field: str, n: int = 1) -> None:
        self.counts[field] += n
        self._counters[field].inc(n)

    def timed(self, seconds: float) -> None:
        self.busy += seconds
        self._busy_ms.inc(int(seconds * 1000))

    def line(self) -> str:
        rate_of = self.fields[1] if len(self.fields) > 1 else self.fields[0]
        rate = self.counts[rate_of] / max(time.monotonic() - self.started, 1e-9)
        parts = [f"{f} {self.counts[f]:,}" + (f" ({rate:,.0f}/s)" if f == rate_of else "") for f in self.fields]
        return f"{self.stage} [pid {os.getpid()}]: " + ", ".join(parts)

    @classmethod
    def _report_forever(cls) -> None:
        while True:
            time.sleep(INTERVAL)
            cls.report()

    @classmethod
    def report(cls) -> None:
        """Log one line per stage that moved since the last report."""
        for p in list(cls._stages.values()):
            now = tuple(p.counts.values())
            if now != p._logged:
                p._logged = now
                log.info(p.line())

    @classmethod
    def reset(cls) -> None:
        """Forget the tallies (a new run in the same process)."""
        with cls._lock:
            cls._stages.clear()


class Timer:
    """`with Timer(progress): ...` adds the block's wall time to the stage's busy seconds."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.progress.timed(time.perf_counter() - self.t0)
        return False
