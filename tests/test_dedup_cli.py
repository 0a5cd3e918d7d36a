"""`flowcurate dedup` end to end: sample shards with planted copies and broken samples, tiny SSCD."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowcurate.dedup.cli import main
from flowcurate.dedup.inputs import read_embeddings, write_embeddings
from flowcurate.models.tiny.procedural import jpeg_bytes, random_image
from flowcurate.models.tiny.sample_data import write_sample_data

N, SEED = 96, 11
GOOD_KINDS = ("exact", "reencode")  # copies any SSCD model must catch at the tiny preset's 0.75


def _rows(out):
    return {r["key"]: r for r in pq.read_table(out / "dedup.parquet").to_pylist()}


def _run(*argv):
    return main([*map(str, argv), "--quiet", "--workers", "0"])


@pytest.fixture(scope="module")
def image_run(tiny_models, tmp_path_factory):
    """One run on N sample images in tars with `--config tiny` (the SSCD model from tiny://)."""
    root = tmp_path_factory.mktemp("dedup_cli")
    truth = write_sample_data(root / "data", n=N, seed=SEED)
    out = root / "out"
    assert _run("--input", root / "data" / "raw" / "*.tar", "--output", out, "--config", "tiny") == 0
    return root, truth, out, _rows(out), json.loads((out / "summary.json").read_text())


def _groups(truth):
    return [[g["original"], *g["copies"]] for g in truth["duplicate_groups"]]


def test_one_row_per_input_and_broken_images_rejected(image_run):
    _, truth, _, rows, summary = image_run
    assert sorted(rows) == truth["keys"]
    rejected = {k: r["reason"] for k, r in rows.items() if r["status"] == "rejected"}
    assert rejected == {k: b["reason"] for k, b in truth["broken"].items()}
    for r in rows.values():
        assert (r["cluster"] is None) == (r["status"] == "rejected")
        assert r["source"] and "#" in r["source"]  # tar#member
    c = summary["counts"]
    assert c["inputs"] == N == c["kept"] + c["duplicate"] + c["rejected"]
    assert c["rejected_by_reason"] == {r: 1 for r in ("empty_file", "missing_image", "truncated", "undecodable")}


def test_planted_copies_removed_and_nothing_else_much(image_run):
    _, truth, _, rows, _ = image_run
    group_of = {k: g for g in map(tuple, _groups(truth)) for k in g}
    for g in truth["duplicate_groups"]:
        members = [g["original"], *g["copies"]]
        strong = [g["original"], *(k for k, kind in g["copies"].items() if kind in GOOD_KINDS)]
        for k in strong:
            r = rows[k]
            assert r["status"] in ("kept", "duplicate"), (k, r)
            # a copy may be removed by a larger unrelated look-alike visited first (Algorithm 1 is
            # greedy); such strays are bounded below
            assert r["status"] == "kept" or rows[r["duplicate_of"]]["status"] == "kept", (k, r, members)
        # exact / re-encoded copies and their original end in one group with one kept image
        assert sum(rows[k]["status"] == "kept" for k in strong) <= 1, [rows[k] for k in strong]
    planted = sum(len(g["copies"]) for g in truth["duplicate_groups"])
    caught = sum(rows[k]["status"] == "duplicate" for g in _groups(truth) for k in g)
    assert caught >= 0.8 * planted
    # unrelated procedural images can look alike to a tiny model: a few, never many
    stray = [k for k, r in rows.items() if r["status"] == "duplicate"
             and (k not in group_of or group_of.get(r["duplicate_of"]) != group_of[k])]
    # measured: 9 of 96 with the seed-0 tiny SSCD at 0.5 (its unrelated pairs reach 0.9; real SSCD is far
    # sharper); the tiny preset now uses 0.75, where the 512-image demo has 13 unrelated pairs above it
    assert len(stray) <= N // 8, stray


def test_duplicates_name_kept_keys_with_true_similarity(image_run):
    _, _, _, rows, _ = image_run
    dups = [r for r in rows.values() if r["status"] == "duplicate"]
    assert dups
    for r in dups:
        assert rows[r["duplicate_of"]]["status"] == "kept"
        assert 0.75 < r["similarity"] <= 1.0 and r["reason"] is None
    for r in rows.values():
        if r["status"] != "duplicate":
            assert r["duplicate_of"] is None


def test_summary_and_contact_sheet(image_run):
    _, _, out, rows, summary = image_run
    table = summary["removed_by_threshold"]
    assert list(table) == ["0.5", "0.6", "0.7", "0.75", "0.8", "0.9", "0.95"]
    assert table["0.5"] is None and table["0.7"] is None  # below the run's threshold: not searched
    values = [v for v in table.values() if v is not None]
    assert values == sorted(values, reverse=True) and values[0] == summary["counts"]["duplicate"]
    exact = sum(r["similarity"] is not None and r["similarity"] > 0.999 for r in rows.values())
    assert values[-1] >= exact > 0
    assert summary["sscd"]["preprocess"] == {"resize": "square", "interpolation": "bilinear", "size": 320,
                                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert summary["sscd"]["location"] == "tiny://sscd.torchscript.pt"
    assert summary["config"]["source"] == "preset:tiny" and summary["parameters"]["threshold"] == 0.75
    assert summary["groups"]["count"] == len({r["duplicate_of"] for r in rows.values() if r["duplicate_of"]})
    assert summary["outputs"]["contact_sheet"] == "duplicates.png"
    with Image.open(out / "duplicates.png") as im:
        assert im.format == "PNG" and im.width >= 800 and im.height > 200
        im.verify()
    emb = read_embeddings(out / "embeddings.parquet")
    assert len(emb.keys) == N - summary["counts"]["rejected"]
    assert np.allclose(np.linalg.norm(emb.embeddings, axis=1), 1, atol=1e-5) and (emb.widths > 0).all()


def test_rerun_on_embeddings_gives_identical_decisions(image_run, tmp_path):
    _, _, out, rows, _ = image_run
    assert _run("--input", out / "embeddings.parquet", "--output", tmp_path / "again", "--config", "tiny") == 0
    again = _rows(tmp_path / "again")
    assert set(again) == {k for k, r in rows.items() if r["status"] != "rejected"}
    fields = ("status", "duplicate_of", "similarity", "cluster", "width", "height")
    assert all({f: again[k][f] for f in fields} == {f: rows[k][f] for f in fields} for k in again)
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["inputs"]["mode"] == "embeddings" and summary["outputs"]["contact_sheet"] is None
    assert not (tmp_path / "again" / "duplicates.png").exists()


def test_npy_with_keys_file(image_run, tmp_path):
    _, _, out, _, _ = image_run
    emb = read_embeddings(out / "embeddings.parquet")
    np.save(tmp_path / "e.npy", emb.embeddings)
    (tmp_path / "keys.txt").write_text("\n".join(emb.keys) + "\n")
    assert _run("--input", tmp_path / "e.npy", "--keys", tmp_path / "keys.txt", "--output", tmp_path / "a",
                "--priority", "key") == 0
    assert _run("--input", out / "embeddings.parquet", "--output", tmp_path / "b", "--priority", "key") == 0
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert {k: (r["status"], r["duplicate_of"]) for k, r in a.items()} == \
           {k: (r["status"], r["duplicate_of"]) for k, r in b.items()}
    assert all(r["width"] is None for r in a.values())


def test_reference_rejects_copies_of_reference_images(image_run, tmp_path):
    root, truth, out, _, _ = image_run
    emb = read_embeddings(out / "embeddings.parquet")
    pos = {k: i for i, k in enumerate(emb.keys)}
    groups = [g for g in truth["duplicate_groups"] if g["original"] in pos][:3]
    ref_rows = [pos[g["original"]] for g in groups]
    # float16 .npy reference (memory-mapped), keys of its own
    np.save(tmp_path / "ref.npy", emb.embeddings[ref_rows].astype(np.float16))
    (tmp_path / "ref.txt").write_text("".join(f"eval-{g['original']}\n" for g in groups))
    res = tmp_path / "res"
    assert _run("--input", root / "data" / "raw", "--output", res, "--config", "tiny",
                "--reference", tmp_path / "ref.npy", "--reference-keys", tmp_path / "ref.txt") == 0
    rows = _rows(res)
    assert sorted(rows) == truth["keys"]
    for g in groups:
        strong = [g["original"], *(k for k, kind in g["copies"].items() if kind in GOOD_KINDS)]
        for k in strong:
            r = rows[k]
            assert (r["status"], r["reason"]) == ("rejected", "filtered:reference"), r
            assert r["reference_key"] == f"eval-{g['original']}" and r["similarity"] > 0.9
            assert r["duplicate_of"] is None and r["cluster"] is None
    filtered = {k for k, r in rows.items() if r["reason"] == "filtered:reference"}
    # filtered items take no part in the dedup: nobody is a duplicate of them
    assert not any(r["duplicate_of"] in filtered for r in rows.values())
    summary = json.loads((res / "summary.json").read_text())
    assert summary["reference"]["matched_inputs"] == len(filtered) >= len(groups)
    assert summary["outputs"]["contact_sheet_shows"]["reference"] > 0


def test_image_folder_with_corrupt_files(tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    img = random_image(rng, 120, 90)[0]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg_bytes(img, 92))
    (tmp_path / "in" / "sub" / "b.jpg").write_bytes(jpeg_bytes(img, 50))  # a re-encoded copy
    (tmp_path / "in" / "c.png").write_bytes(b"")
    (tmp_path / "in" / "d.jpg").write_bytes(b"GIF89a not really")
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    assert _run("--input", tmp_path / "in", "--output", tmp_path / "out", "--config", "tiny") == 0
    rows = _rows(tmp_path / "out")
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "a": ("kept", None), "sub/b": ("duplicate", None), "c": ("rejected", "empty_file"),
        "d": ("rejected", "undecodable")}
    assert rows["sub/b"]["duplicate_of"] == "a" and rows["a"]["width"] == 120
    # nothing decodable at all: every input is a rejected row, and that is not an error
    assert _run("--input", tmp_path / "in" / "c.png", "--output", tmp_path / "none", "--config", "tiny") == 0
    assert _rows(tmp_path / "none")["c"]["status"] == "rejected"


def _list_parquet(path, vectors, keys=None):
    keys = keys or [f"k{i}" for i in range(len(vectors))]
    pq.write_table(pa.table({"key": keys, "embedding": pa.array(vectors, pa.list_(pa.float32()))}), path)


@pytest.mark.parametrize("case, message", [
    ("mixed_dims", "mixed dimensions"),
    ("nan_rows", "zero, NaN or infinite (first: 'k1'"),
    ("zero_row", "zero, NaN or infinite (first: 'k2'"),
    ("empty", "no embeddings"),
    ("empty_npy", "no embeddings"),
    ("npy_without_keys", "need a keys file"),
    ("not_parquet", "not a readable Parquet file"),
    ("ref_dims", "--reference embeddings are 3-d but --input's are 4-d"),
    ("no_such_input", "matches nothing"),
])
def test_bad_embedding_files_exit_2_with_one_line(case, message, tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = rng.standard_normal((4, 4)).astype(np.float32)
    path = tmp_path / "e.parquet"
    extra = []
    if case == "mixed_dims":
        _list_parquet(path, [[1.0, 0.0], [1.0, 0.0, 0.0]])
    elif case == "nan_rows":
        good[1, 2] = np.nan
        _list_parquet(path, good.tolist())
    elif case == "zero_row":
        good[2] = 0
        _list_parquet(path, good.tolist())
    elif case == "empty":
        _list_parquet(path, [])
    elif case == "empty_npy":
        path = tmp_path / "e.npy"
        np.save(path, np.zeros((0, 4), np.float16))
        (tmp_path / "k.txt").write_text("")
        extra = ["--keys", tmp_path / "k.txt"]
    elif case == "npy_without_keys":
        path = tmp_path / "e.npy"
        np.save(path, good)
    elif case == "not_parquet":
        path.write_text("key,embedding\n")
    elif case == "ref_dims":
        _list_parquet(path, good.tolist())
        _list_parquet(tmp_path / "r.parquet", [[1.0, 0.0, 0.0]])
        extra = ["--reference", tmp_path / "r.parquet"]
    elif case == "no_such_input":
        path = tmp_path / "missing" / "*.parquet"
    capsys.readouterr()
    assert main([str(a) for a in ("--input", path, "--output", tmp_path / "out", "--quiet", *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m flowcurate.dedup: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out" / "dedup.parquet").exists()


def test_skip_bad_embeddings_makes_rows(tmp_path):
    e = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    e[3] = np.nan
    e[4] = e[0] * 3  # a duplicate at any scale (descriptors are normalised by the search)
    write_embeddings(tmp_path / "e.parquet", [f"k{i}" for i in range(5)], e)
    assert _run("--input", tmp_path / "e.parquet", "--output", tmp_path / "o", "--skip-bad-embeddings") == 0
    rows = _rows(tmp_path / "o")
    assert (rows["k3"]["status"], rows["k3"]["reason"]) == ("rejected", "bad_embedding")
    assert (rows["k4"]["status"], rows["k4"]["duplicate_of"], rows["k4"]["similarity"]) == ("duplicate", "k0", 1.0)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["counts"]["bad_embedding"] == 1 and summary["inputs"]["dtype"] == "float32"


def test_umbrella_command_and_python_m(tmp_path, capsys):
    from flowcurate.cli.main import main as flowcurate

    e = np.eye(3, 6, dtype=np.float32)
    write_embeddings(tmp_path / "e.parquet", ["a", "b", "c"], e)
    assert flowcurate(["dedup", "--input", str(tmp_path / "e.parquet"), "--output", str(tmp_path / "o"),
                       "--exact", "--threshold", "0.9", "--quiet"]) == 0
    assert "3 inputs: 3 kept" in capsys.readouterr().out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["parameters"]["exact"] is True and summary["parameters"]["threshold"] == 0.9
    assert summary["removed_by_threshold"]["0.5"] is None and summary["removed_by_threshold"]["0.9"] == 0
    r = subprocess.run([sys.executable, "-m", "flowcurate.dedup", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "flowcurate dedup --input emb.npy --keys keys.txt" in r.stdout
    with pytest.raises(SystemExit) as exit_:
        flowcurate(["dedup", "--input", "x", "--output", "y", "--threshold", "1.5"])
    assert exit_.value.code == 2


def test_kmeans_choice_reaches_the_search_and_the_summary(image_run, tmp_path):
    _, _, out, rows, _ = image_run
    for kmeans, label in (("torch", "torch:cpu"), ("faiss", "faiss")):
        dest = tmp_path / kmeans
        assert _run("--input", out / "embeddings.parquet", "--output", dest, "--config", "tiny",
                    "--clusters", "4", "--kmeans", kmeans) == 0
        summary = json.loads((dest / "summary.json").read_text())
        assert summary["search"]["kmeans"] == label and summary["parameters"]["kmeans"] == kmeans
        got = _rows(dest)
        assert {k for k, r in got.items() if r["status"] == "kept"} <= set(rows)
    with pytest.raises(SystemExit):
        _run("--input", out / "embeddings.parquet", "--output", tmp_path / "x", "--kmeans", "sklearn")


def test_outputs_are_readable_by_the_team(image_run):
    """Under the default umask (022) every file written is 0644, folders 0755 (mkstemp alone gives 0600)."""
    _, _, out, _, _ = image_run
    for path in out.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode & 0o044 == 0o044, (path, oct(mode))


def test_uri_inputs_read_through_pyarrow_filesystems_decide_the_same(image_run, tmp_path):
    """--input as a URI (here file://, the same code path as gs:// and s3://) gives the same decisions."""
    root, _, _, rows, _ = image_run
    assert _run("--input", f"file://{root}/data/raw/*.tar", "--output", tmp_path / "uri", "--config", "tiny") == 0
    got = _rows(tmp_path / "uri")
    assert got.keys() == rows.keys()
    for k, r in rows.items():
        assert (got[k]["status"], got[k]["reason"], got[k]["duplicate_of"]) == (r["status"], r["reason"], r["duplicate_of"])
        assert got[k]["source"] == f"file://{r['source']}"
    emb = tmp_path / "uri" / "embeddings.parquet"
    assert _run("--input", f"file://{emb}", "--output", tmp_path / "uri2", "--config", "tiny") == 0
    assert {k: r["status"] for k, r in _rows(tmp_path / "uri2").items()} == {
        k: r["status"] for k, r in got.items() if r["status"] != "rejected"}
