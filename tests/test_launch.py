"""Bad launches fail loudly, at once, in every subcommand (as a user types them: subprocesses): an input
that matches nothing, a misspelt option, an unknown runner, a run that rejects every input, and the
default (real) models offline. And `--help` stays instant: building the parser imports nothing heavy."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "flowcurate"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def flowcurate(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=OFFLINE, cwd=cwd)


def test_building_the_parser_imports_nothing_heavy():
    code = ("import sys; from flowcurate.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'apache_beam', 'transformers', 'diffusers', 'faiss') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("args, pattern", [
    (["run", "--input", "{tmp}/nothing/*.tar", "--output", "{tmp}/o", "--config", "tiny"], "{tmp}/nothing/*.tar"),
    (["run", "--input", "/nonexistent/x.tar", "--output", "{tmp}/o", "--config", "tiny"], "/nonexistent/x.tar"),
    (["dedup", "--input", "{tmp}/nothing/*.jpg", "--output", "{tmp}/o", "--config", "tiny"], "{tmp}/nothing/*.jpg"),
])
def test_an_input_that_matches_nothing_exits_2_naming_it(tmp_path, args, pattern):
    r = flowcurate(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert pattern.format(tmp=tmp_path) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "shards").exists()


@pytest.mark.parametrize("cmd, typo, suggestion", [
    ("run", "--dedup_treshold", "--dedup_threshold"),
    ("dedup", "--treshold", "--threshold"),
    ("train", "--max-stepz", "--max-steps"),
])
def test_a_misspelt_option_stops_the_launch_with_a_suggestion(tmp_path, cmd, typo, suggestion):
    base = {"run": ["--input", f"{tmp_path}/*.tar", "--output", tmp_path / "o", "--config", "tiny"],
            "dedup": ["--input", tmp_path, "--output", tmp_path / "o"],
            "train": ["--shards", tmp_path, "--output", tmp_path / "o"]}[cmd]
    r = flowcurate(cmd, *base, typo, "0.9")
    assert r.returncode == 2 and typo in r.stderr and suggestion in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_runner_is_one_line_listing_the_runners(tmp_path):
    r = flowcurate("run", "--input", f"{tmp_path}/*.tar", "--output", tmp_path / "o", "--config", "tiny",
                   "--runner", "Bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "Bogus" in ln]
    assert "DataflowRunner" in line and "FnApiRunner" in line and "SparkRunner" in line


def test_a_run_that_rejects_every_input_exits_non_zero_with_the_counts(tmp_path):
    raw = tmp_path / "raw.tar"
    with tarfile.open(raw, "w") as tar:
        for i, data in enumerate([b"not an image", b"", b"\x89PNG\r\n\x1a\nbroken"]):
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    r = flowcurate("run", "--input", raw, "--output", tmp_path / "o", "--config", "tiny")
    assert r.returncode == 1, r.stderr
    assert "rejected 3" in r.stdout and "undecodable" in r.stdout and "empty_file" in r.stdout
    assert "every input was rejected" in r.stderr


@pytest.mark.parametrize("args", [
    ["run", "--input", "{raw}", "--output", "{tmp}/o"],
    ["dedup", "--input", "{raw}", "--output", "{tmp}/o"],
])
def test_the_default_real_models_offline_say_how_to_use_the_tiny_ones(tmp_path, args):
    raw = tmp_path / "raw.tar"
    with tarfile.open(raw, "w") as tar:
        info = tarfile.TarInfo("0000.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    r = flowcurate(*[a.format(tmp=tmp_path, raw=raw) for a in args])
    assert r.returncode == 2, r.stderr
    assert "pass --config tiny for the offline tiny models" in r.stderr and "Traceback" not in r.stderr


def test_train_with_the_default_preset_on_tiny_shards_says_how_to_use_the_tiny_ones(tmp_path):
    golden = Path(__file__).parent / "data" / "golden"
    r = flowcurate("train", "--shards", golden, "--output", tmp_path / "run", "--max-steps", "1")
    assert r.returncode == 2, r.stderr
    assert "pass --config tiny for the offline tiny models" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
