"""The tiny-model cache: one build per seed, atomic, rebuilt when the builder code changes."""

import json
import multiprocessing as mp
import time

import pytest

from flowcurate.formats.config import load_config
from flowcurate.models import tiny


def _fake_build(out, seed=0, log=print):
    # Stands in for the multi-minute builders so the cache mechanics can be tested quickly; the real
    # builds are tested through the `tiny_models` fixture.
    out.mkdir(parents=True)
    time.sleep(0.5)
    for role in tiny.ROLES:
        (out / role).write_text(f"{role} seed {seed}")
    calls = out.parent.parent / "calls"
    with open(calls, "a") as fh:
        fh.write("x")
    (out / tiny.REPORT).write_text(json.dumps({"seed": seed, "source_hash": tiny.source_hash()}))


def _ensure(cache, q):
    import os

    os.environ["FLOWCURATE_CACHE"] = str(cache)
    tiny.build = _fake_build
    q.put(str(tiny.ensure_tiny_models(7, log=lambda m: None)))


def test_concurrent_callers_build_once(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(tmp_path, q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    paths = {q.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / "tiny" / f"v{tiny.VERSION}-seed7-{tiny.source_hash()}")}
    assert (tmp_path / "tiny" / "calls").read_text() == "x"  # built exactly once
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.name.startswith(".v") and p.is_dir()]


def test_stale_build_is_replaced_and_tiny_urls_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWCURATE_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "build", _fake_build)
    first = tiny.ensure_tiny_models(1, log=lambda m: None)
    report = json.loads((first / tiny.REPORT).read_text())
    (first / tiny.REPORT).write_text(json.dumps({**report, "source_hash": "older-code"}))
    again = tiny.ensure_tiny_models(1, log=lambda m: None)
    assert again == first and (tmp_path / "tiny" / "calls").read_text() == "xx"

    cfg = tiny.resolve_models(load_config("tiny"), seed=1, log=lambda m: None)
    assert cfg.models.sd3 == str(first / "sd3") and cfg.models.sscd == str(first / "sscd.torchscript.pt")
    assert tiny.resolve_tiny("/some/path") == "/some/path"
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny.resolve_tiny("tiny://nope")

    out = tiny.write_tiny_models(tmp_path / "copy", seed=1, log=lambda m: None)
    assert (out / "captioner").read_text() == "captioner seed 1"


def test_real_build_report(tiny_models):
    report = json.loads((tiny_models / tiny.REPORT).read_text())
    assert report["version"] == tiny.VERSION and report["seed"] == 0
    assert report["source_hash"] == tiny.source_hash()
    size = sum(p.stat().st_size for p in tiny_models.rglob("*") if p.is_file())
    assert size < 50e6, f"tiny models take {size / 1e6:.1f} MB"
