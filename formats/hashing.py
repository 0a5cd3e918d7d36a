"""Stable hashes of keys, one per named purpose (hashlib, never Python's salted `hash()`).

Every caller names what the hash is for; each purpose keeps its own algorithm and salt, so the
values (and with them every split, k-means sample and noise draw) stay what they were
when each purpose was introduced, and no two purposes are correlated.

| purpose          | used for                                                  | algorithm              |
|------------------|-----------------------------------------------------------|------------------------|
| `split`          | train/val split of kept keys                              | sha256("split:" + key) |
| `sample`         | the trainer's per-sample random stream (caption choice)   | sha256("sample:" + key)|
| `kmeans_sample`  | which keys train the dedup k-means                        | blake2b, person "fc-kmeans" |
| `noise`          | the trainer's per-step noise generator (key "seed:step:stream") | sha256(key)      |
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

_SHA_PREFIX = {"split": "split:", "sample": "sample:", "noise": ""}
_BLAKE_PERSON = {"kmeans_sample": b"fc-kmeans"}
PURPOSES = (*_SHA_PREFIX, *_BLAKE_PERSON)


def hasher(purpose: str) -> Callable[[str], int]:
    """The 64-bit hash function of `purpose` (for hot loops: look it up once, call it per key)."""
    if purpose in _SHA_PREFIX:
        prefix = _SHA_PREFIX[purpose].encode()
        sha, from_bytes = hashlib.sha256, int.from_bytes
        return lambda key: from_bytes(sha(prefix + key.encode()).digest()[:8], "big")
    if purpose in _BLAKE_PERSON:
        person, blake, from_bytes = _BLAKE_PERSON[purpose], hashlib.blake2b, int.from_bytes
        return lambda key: from_bytes(blake(key.encode(), digest_size=8, person=person).digest(), "big")
    raise ValueError(f"unknown hash purpose {purpose!r}; known: {PURPOSES}")


def stable_hash(purpose: str, key: str) -> int:
    """An unsigned 64-bit hash of `key` for `purpose` (see the table above)."""
    return hasher(purpose)(key)


def fraction_cut(fraction: float) -> int:
    """Hashes below this are the given fraction of all keys."""
    return int(min(max(fraction, 0.0), 1.0) * 2**64)
