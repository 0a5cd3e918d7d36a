"""formats.hashing: each purpose keeps the algorithm and salt it had before the helper existed, so
splits, shards, chunks, k-means samples and noise draws are unchanged; files.write_atomic is atomic."""

import hashlib
import os

import pytest

from flowcurate.formats.files import write_atomic
from flowcurate.formats.hashing import PURPOSES, fraction_cut, hasher, stable_hash

KEYS = ["000123", "a/b/0001", "", "ünïcode", "7:12:0"]


def sha(prefix: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{prefix}{key}".encode()).digest()[:8], "big")


def blake(person: bytes, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=person).digest(), "big")


@pytest.mark.parametrize("key", KEYS)
def test_each_purpose_keeps_its_algorithm_and_salt(key):
    assert stable_hash("split", key) == sha("split:", key)
    assert stable_hash("sample", key) == sha("sample:", key)
    assert stable_hash("noise", key) == sha("", key)
    assert stable_hash("kmeans_sample", key) == blake(b"fc-kmeans", key)
    assert len({stable_hash(p, key) for p in PURPOSES}) == len(PURPOSES)  # purposes are independent


def test_unknown_purpose_and_cut():
    with pytest.raises(ValueError, match="unknown hash purpose"):
        hasher("splits")
    assert fraction_cut(0.0) == 0 and fraction_cut(1.5) == 2**64 and fraction_cut(0.5) == 2**63


def test_write_atomic_replaces_whole_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    write_atomic(path, b"one")
    write_atomic(path, lambda tmp: open(tmp, "wb").write(b"two"))
    assert path.read_bytes() == b"two"

    def fail(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert path.read_bytes() == b"two" and os.listdir(path.parent) == ["f.bin"]
    # readable by the team under the default umask, as open() would make it (mkstemp alone: 0600)
    old = os.umask(0o022)
    try:
        write_atomic(path, b"three")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_atomic(path, b"four")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
