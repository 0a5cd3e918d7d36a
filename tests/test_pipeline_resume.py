"""Resumable curation: a `flowcurate run` killed part-way and started again with the same command
reuses pass 1's records of the files it finished and writes exactly what an uninterrupted run writes;
a folder holding another run is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.options import OptionsError
from flowcurate.pipeline.run import run
from tests.pipeline_inputs import assert_same_shards, read_manifest

BIN = Path(sys.executable).parent / "flowcurate"


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(data / "raw" / "*.tar"), "--output", str(out), "--config", "tiny", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_sample_data(root / "data", n=160, seed=9)  # 2 input tars (128 + 32)
    stats = run(args(root / "data", root / "whole"), log=lambda *a, **k: None)
    return root, stats


def test_killed_run_resumes_to_the_same_outputs(uninterrupted):
    root, whole = uninterrupted
    out = root / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(BIN), "run", *args(root / "data", out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / ".pass1").glob("*/*.parquet")):  # kill once a file's records are kept
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists()
    kept_files = len(list((out / ".pass1").glob("*/*.parquet")))

    again = run(args(root / "data", out), log=lambda *a, **k: None)  # the same command
    assert again["output"] == "resumed"
    assert again["stages"]["pass 1"]["reused"] >= 1 and kept_files >= 1
    assert again["stages"]["pass 1"].get("inputs", 0) < whole["inputs"]  # the reused files were not read
    assert read_manifest(out) == read_manifest(root / "whole")
    assert_same_shards(root / "whole", out)
    first = {p.name: p.read_bytes() for p in (root / "whole" / "shards").glob("*.tar")}
    second = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    assert first == second  # byte-identical


def test_run_killed_in_pass_2_reuses_the_files_it_finished(uninterrupted):
    root, whole = uninterrupted
    out = root / "killed2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(BIN), "run", *args(root / "data", out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / ".pass2" / "done").glob("*.pkl")):  # kill once pass 2 finished a file
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists()

    again = run(args(root / "data", out), log=lambda *a, **k: None)
    assert again["output"] == "resumed"
    assert again["stages"]["pass 2"]["reused"] >= 1
    assert again["stages"]["pass 2"].get("written", 0) == whole["stages"]["pass 2"]["written"]
    assert read_manifest(out) == read_manifest(root / "whole")
    first = {p.name: p.read_bytes() for p in (root / "whole" / "shards").glob("*.tar")}
    second = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    assert first == second  # byte-identical
    assert not (out / ".pass2").exists()  # a finished run leaves no resume state behind


def test_a_finished_run_repeated_reads_nothing_again(uninterrupted):
    root, whole = uninterrupted
    again = run(args(root / "data", root / "whole"), log=lambda *a, **k: None)
    assert again["output"] == "resumed" and again["stages"]["pass 1"]["reused"] == whole["inputs"]
    assert "inputs" not in again["stages"]["pass 1"] and again["status"] == whole["status"]


def test_every_output_file_is_readable_under_the_umask(uninterrupted):
    from flowcurate.formats.files import umask

    root, _ = uninterrupted
    want = 0o666 & ~umask()
    modes = {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in (root / "whole").rglob("*") if p.is_file()}
    assert len(modes) > 5 and set(modes.values()) == {oct(want)}, modes


def test_another_run_is_refused_and_resume_needs_a_run(uninterrupted, tmp_path):
    root, _ = uninterrupted
    with pytest.raises(OptionsError, match="another run"):
        run(args(root / "data", root / "whole", "--resolution", "48"), log=lambda *a, **k: None)
    with pytest.raises(OptionsError, match="--resume"):
        run(args(root / "data", tmp_path / "fresh", "--resume"), log=lambda *a, **k: None)
