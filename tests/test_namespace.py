"""flowcurate installs as one namespace: nothing else at the top of site-packages, and a user's own
`models.py`, `pipeline.py` or `trainer/` package in the working folder neither breaks us nor is
shadowed by us."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_install_puts_only_flowcurate_at_top_level(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top == {"flowcurate"}, top
    assert not (target / "flowcurate" / "__init__.py").exists(), "flowcurate must stay a namespace package"
    assert {p.name for p in (target / "flowcurate").iterdir()} >= {
        "cli", "formats", "models", "captioning", "dedup", "trainer", "pipeline"}
    assert (target / "flowcurate" / "formats" / "presets" / "sd3.toml").is_file()


def test_users_own_models_pipeline_and_trainer_do_not_interfere(tmp_path):
    (tmp_path / "models.py").write_text("MARK = 'the user models.py'\n")
    (tmp_path / "pipeline.py").write_text("raise SystemExit('the user pipeline.py was imported')\n")
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("raise SystemExit('the user trainer was imported')\n")
    env = {**os.environ, "PYTHONPATH": ""}

    def run(*cmd):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        return r.stdout

    assert "flowcurate run --input" in run(str(BIN / "flowcurate"), "--help")
    assert '"source": "preset:tiny"' in run(str(BIN / "flowcurate"), "config", "--config", "tiny")
    assert "--input" in run(sys.executable, "-m", "flowcurate.pipeline", "--help")
    assert run(sys.executable, "-c", "import models; print(models.MARK)").strip() == "the user models.py"


def test_no_extra_installs_a_second_faiss():
    """faiss-cpu and faiss-gpu wheels both ship `faiss/`: one would overwrite the other."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    faiss = [d for d in project["dependencies"] if d.lower().startswith("faiss")]
    assert len(faiss) == 1
    for extra, deps in project["optional-dependencies"].items():
        assert not [d for d in deps if d.lower().startswith("faiss")], extra
