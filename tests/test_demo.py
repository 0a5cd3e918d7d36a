"""`flowcurate demo` (what `make demo` runs): the whole journey on a small sample, every printed path
exists, and the numbers it prints come from the run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from flowcurate.cli.main import main


def test_demo_runs_the_whole_journey(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--n", "48", "--train-steps", "20"]) == 0
    out = capsys.readouterr().out
    for step in ("flowcurate run", "flowcurate train", "flowcurate sample", "flowcurate memorization"):
        assert step in out
    printed = [line.split(":", 1)[1].strip() for line in out.splitlines()
               if line.startswith("  ") and ":" in line and str(tmp_path) in line]
    assert len(printed) >= 10
    from pathlib import Path

    assert all(Path(p).exists() for p in printed), printed
    stats = json.loads((tmp_path / "demo" / "curated" / "stats.json").read_text())
    assert f"{stats['inputs']} inputs -> {stats['status']['kept']} kept" in out
    report = pq.read_table(tmp_path / "demo" / "memorization" / "report.parquet")
    assert report.num_rows > 0 and f"{report.num_rows} generations" in out
