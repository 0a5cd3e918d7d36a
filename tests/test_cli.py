import json
import subprocess
import sys

import pytest

from flowcurate.cli.main import main


def test_help_lists_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    # every subcommand has an example line in the top-level help
    from flowcurate.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert len(commands) >= 8
    for name in commands:
        assert f"  flowcurate {name} " in out, f"no example for `flowcurate {name}` in --help"


def test_config_command_prints_json(capsys, tmp_path):
    assert main(["config", "--config", "sd3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["dedup"]["threshold"] == 0.5 and cfg["source"] == "preset:sd3"
    bad = tmp_path / "bad.toml"
    bad.write_text("[nope]\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert "nope" in capsys.readouterr().err


def test_sample_data_command_and_python_m(tmp_path):
    assert main(["sample-data", "--output", str(tmp_path / "a"), "--n", "32"]) == 0
    r = subprocess.run([sys.executable, "-m", "flowcurate.models", "sample-data", "--output", str(tmp_path / "b"),
                        "--n", "32"], capture_output=True, text=True, check=True)
    assert "truth.json" in r.stdout
    assert (tmp_path / "a" / "truth.json").read_bytes() == (tmp_path / "b" / "truth.json").read_bytes()


@pytest.mark.parametrize("pkg", ["pipeline", "dedup", "trainer", "captioning"])
def test_package_entry_points_exist(pkg):
    if pkg == "dedup":  # available: `python -m flowcurate.dedup` is `flowcurate dedup`
        r = subprocess.run([sys.executable, "-m", f"flowcurate.{pkg}", "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--input SPEC" in r.stdout and "summary.json" in r.stdout
        return
    if pkg == "trainer":  # available: `python -m flowcurate.trainer train|sample` is `flowcurate train|sample`
        r = subprocess.run([sys.executable, "-m", f"flowcurate.{pkg}", "train", "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--shards" in r.stdout and "torchrun" in r.stdout
        r = subprocess.run([sys.executable, "-m", f"flowcurate.{pkg}", "sample", "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--checkpoint" in r.stdout
        return
    if pkg == "pipeline":  # `python -m flowcurate.pipeline` is `flowcurate run`
        r = subprocess.run([sys.executable, "-m", f"flowcurate.{pkg}", "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--input" in r.stdout and "DataflowRunner" in r.stdout
        assert "apitools" not in r.stderr
        return
    r = subprocess.run([sys.executable, "-m", f"flowcurate.{pkg}", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--model" in r.stdout and "--prompt" in r.stdout


def test_captioning_entry_point_captions_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "-m", "flowcurate.captioning", str(tmp_path / "red.png"), str(tmp_path / "bad.jpg"),
                        "--config", "tiny", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    line = r.stdout.strip().split("\t")
    assert line[0].endswith("red.png") and line[1].strip()
    assert "bad.jpg" in r.stderr and "undecodable" in r.stderr
