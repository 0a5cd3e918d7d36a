"""flowcurate.dedup.inputs: listing images and tars (hostile ones too), embedding, embedding files."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flowcurate.dedup.inputs import (
    InputError,
    embed_images,
    expand,
    list_images,
    read_embeddings,
    write_embeddings,
)
from flowcurate.formats.tars import sanitize_key
from flowcurate.models.sscd import SSCDPreprocess, load_sscd
from flowcurate.models.tiny.procedural import jpeg_bytes, random_image
from flowcurate.models.tiny.sample_data import write_sample_data


def test_sample_data_listing_accounts_for_every_key(tmp_path):
    truth = write_sample_data(tmp_path, n=96, seed=5)
    listing = list_images(expand([str(tmp_path / "raw" / "*.tar")]))
    keys = [it.key for it in listing.items] + [k for k, _, _ in listing.rejected]
    assert sorted(keys) == truth["keys"]
    missing = {k for k, _, r in listing.rejected if r == "missing_image"}
    assert missing == {k for k, b in truth["broken"].items() if b["reason"] == "missing_image"}
    assert all(it.source.startswith(str(tmp_path / "raw")) and "#" in it.source for it in listing.items)


def test_hostile_tars_are_contained(tmp_path, write_tar):
    rng = np.random.default_rng(0)
    jpg = jpeg_bytes(random_image(rng, 64)[0])
    write_tar(tmp_path / "a.tar", [("../../etc/passwd.jpg", jpg), ("0001.jpg", jpg), ("0001.txt", b"cap"),
                              ("dir/0002.png", jpg)])
    write_tar(tmp_path / "b.tar", [("0001.jpg", jpg), ("0003.jpg", jpg)])  # 0001 repeats a.tar's key
    whole = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(whole[:4000])  # cut inside the second member (data at 3072..5091)
    listed = []
    listing = list_images(expand([str(tmp_path)]), progress=listed.append)
    assert sum(listed) == 3  # the progress bar counts every listed file
    keys = sorted(it.key for it in listing.items)
    assert "etc/passwd" in keys and "dir/0002" in keys and not any(".." in k for k in keys)
    reasons = {k: r for k, _, r in listing.rejected}
    assert reasons["0001~2"] == "duplicate_key"
    assert [r for r in reasons.values() if r == "unreadable_archive_tail"] == ["unreadable_archive_tail"]
    assert "c#truncated" in reasons
    assert sanitize_key("../../a b/./c") == "a_b/c"


def test_expand_errors_on_nothing(tmp_path):
    with pytest.raises(InputError, match="matches nothing"):
        expand([str(tmp_path / "*.jpg")])


def test_embed_images_is_independent_of_workers(tiny_models, tmp_path):
    write_sample_data(tmp_path, n=48, seed=2)
    listing = list_images(expand([str(tmp_path / "raw")]))
    model = load_sscd(tiny_models / "sscd.torchscript.pt")
    pre = SSCDPreprocess()
    a = embed_images(listing, model, pre, batch_size=8, workers=0)
    b = embed_images(listing, model, pre, batch_size=8, workers=2)
    assert a.keys == b.keys and np.array_equal(a.embeddings, b.embeddings)
    assert len(a.keys) + len(a.rejected) == 48
    assert {r for _, _, r in a.rejected} == {"truncated", "empty_file", "undecodable", "missing_image"}
    assert (a.widths > 0).all() and np.allclose(np.linalg.norm(a.embeddings, axis=1), 1, atol=1e-5)

    write_embeddings(tmp_path / "e.parquet", a.keys, a.embeddings, a.widths, a.heights)
    back = read_embeddings(tmp_path / "e.parquet")
    assert back.keys == a.keys and np.array_equal(back.embeddings, a.embeddings)
    assert np.array_equal(back.widths, a.widths)
    assert torch.equal(torch.from_numpy(back.embeddings), torch.from_numpy(a.embeddings))


def test_embedding_files(tmp_path):
    e = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float16)
    np.save(tmp_path / "e.npy", e)
    (tmp_path / "keys.txt").write_text("\n".join(f"k{i}" for i in range(5)) + "\n")
    got = read_embeddings(tmp_path / "e.npy", tmp_path / "keys.txt")
    assert isinstance(got.embeddings, np.memmap) and got.embeddings.dtype == np.float16
    with pytest.raises(InputError, match="keys file"):
        read_embeddings(tmp_path / "e.npy")
    (tmp_path / "keys.txt").write_text("a\nb\n")
    with pytest.raises(InputError, match="5 rows but 2 keys"):
        read_embeddings(tmp_path / "e.npy", tmp_path / "keys.txt")

    mixed = pa.table({"key": ["a", "b"], "embedding": [[1.0, 0.0], [1.0, 0.0, 0.0]]})
    pq.write_table(mixed, tmp_path / "m.parquet")
    with pytest.raises(InputError, match="mixed dimensions"):
        read_embeddings(tmp_path / "m.parquet")
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32()))}),
                   tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="no embeddings"):
        read_embeddings(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "wrong.parquet")
    with pytest.raises(InputError, match="missing column"):
        read_embeddings(tmp_path / "wrong.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable Parquet"):
        read_embeddings(tmp_path / "junk.parquet")
