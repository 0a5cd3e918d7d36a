"""Curated shards -> training batches: read with webdataset, validate against the conditioning record,
pick a caption, drop encoders, assemble the context, sample the latent, batch by latent shape.

The stream is endless and deterministic, so a resumed run replays it exactly:
- epoch e visits the shards in an order drawn from (seed, e); each DataLoader worker reads every W-th
  of them (after the per-rank split when ranks read disjoint shards);
- a seeded shuffle buffer and per-shape buckets (aspect buckets: a batch holds one latent shape) carry
  over from epoch to epoch, so no sample is dropped at an epoch end;
- each sample's random choices (caption variant, encoder drops, latent noise) come from a generator
  seeded by (seed, epoch, key), not from the stream position;
- the data position is the number of batches consumed; `skip_batches` replays and discards them
  (cheap: batches are formed from the parsed json and only decoded when kept).

Distributed modes (`split`): `global` (every rank reads the same stream, forms the global batch and
keeps its slice: the same global batches as one process, used when there are few shards), `shards`
(ranks read disjoint shards: the scalable default when every rank and worker gets at least one), and
`resampled` (every worker draws shards with replacement, WebDataset's multi-node mode; ranks never
run dry). `auto` picks `shards` when there are enough shards, else `global`.
"""

from __future__ import annotations

import glob
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flowcurate.formats import shards as S
from flowcurate.formats.hashing import stable_hash
from flowcurate.models.autoencoder import to_model_space


class DataError(S.ShardFormatError):
    """Unusable training data: no shards, no samples, a record that does not match."""


# ------------------------------------------------------------------------------------------------------
# Where the shards and the conditioning record are

def resolve_shards(spec: str, split: str = "train") -> tuple[list[str], Path | None]:
    """`spec`: a pipeline output folder (`OUT`, using `OUT/shards/index.json`), a shards folder, brace
    notation (`out/shards/train-{000000..000031}.tar`), a glob, or URLs joined by `::`. Returns the shard
    URLs of `split` and the conditioning record found beside them (None when none is)."""
    path = Path(spec)
    if path.is_dir():
        shards_dir = path / "shards" if (path / "shards" / S.INDEX_JSON).exists() else path
        index = S.read_index(shards_dir)
        urls = [str(shards_dir / s["name"]) for s in index["shards"] if s["split"] == split]
        record = shards_dir.parent / S.RECORD_JSON
        return urls, record if record.exists() else None
    urls: list[str] = []
    for part in spec.split("::"):
        for expanded in wds.shardlists.expand_urls(part):
            urls.extend(sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded])
    record = None
    if urls and "://" not in urls[0]:
        for parent in (Path(urls[0]).parent, Path(urls[0]).parent.parent):
            if (parent / S.RECORD_JSON).exists():
                record = parent / S.RECORD_JSON
                break
    return urls, record


# ------------------------------------------------------------------------------------------------------
# Per-sample transform

@dataclass(frozen=True)
class Augment:
    """The SD3 training-time choices (all seeded per sample)."""

    orig_caption_prob: float = 0.5  # SD3 §5.2.2: 50 % original, 50 % synthetic captions
    text_drop_prob: float = 0.464  # SD3 App. B.3: each encoder dropped independently
    sample_latent: bool = True  # z ~ posterior (else its mean)


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, stable_hash("sample", key) & 0xFFFFFFFF])


def decode_sample(raw: dict, doc: dict, record: S.Conditioning, aug: Augment | None, seed: int, epoch: int):
    """Raw members -> (latent (C,h,w) model space, parts {part: array}, keep {role: 0/1}) as float32.
    `aug=None` is the evaluation view: original caption, no drops, posterior mean."""
    rng = sample_rng(seed, epoch, doc["key"])
    variant = "orig" if aug is None or rng.random() < aug.orig_caption_prob else "syn"
    # decode (and check) only what this sample feeds: the latents and the chosen caption's encodings
    names = [*S.LATENT_MEMBERS, *(f"{variant}.{p}.npy" for p in S.PARTS)]
    arrays = {m: S.load_npy(raw[m]) for m in names}
    S.check_arrays(arrays, doc, record, raw.get("__url__", ""))
    keep = {r: 1.0 if aug is None or rng.random() >= aug.text_drop_prob else 0.0 for r in ("clip_l", "clip_g", "t5")}
    mean = arrays["latent_mean.npy"].astype(np.float32)
    if aug is not None and aug.sample_latent:
        std = np.exp(0.5 * arrays["latent_logvar.npy"].astype(np.float32))
        mean = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    ae = record.json["autoencoder"]
    latent = to_model_space(torch.from_numpy(mean), ae["scaling_factor"], ae["shift_factor"])
    # stay in the stored float16 until the batch is assembled (one vectorised conversion in collate)
    parts = {p: torch.from_numpy(arrays[f"{variant}.{p}.npy"]) for p in S.PARTS}
    return latent, parts, keep, variant


def collate(items: list, keys: list[str]) -> dict:
    latents = torch.stack([it[0] for it in items])
    parts = {p: torch.stack([it[1][p] for it in items]) for p in S.PARTS}
    keep = {r: torch.tensor([it[2][r] for it in items]) for r in ("clip_l", "clip_g", "t5")}
    context, pooled = S.assemble(parts, keep)  # exact in float16: concatenation, zero pad, 0/1 masks
    return {"latents": latents, "context": context.float(), "pooled": pooled.float(), "keys": keys,
            "variants": [it[3] for it in items], "keep": keep}


# ------------------------------------------------------------------------------------------------------
# The stream

class CuratedShards(IterableDataset):
    """Endless training batches (or one pass over validation shards with `train=False`).

    batch_size is the *global* batch; each rank receives batch_size // world_size samples."""

    def __init__(self, urls: list[str], record: S.Conditioning, batch_size: int, *, seed: int = 0,
                 augment: Augment | None = Augment(), train: bool = True, shuffle_buffer: int = 256,
                 rank: int = 0, world_size: int = 1, split: str = "auto", num_workers: int = 0,
                 skip_batches: int = 0):
        if not urls:
            raise DataError("no shards to read")
        if batch_size % world_size:
            raise DataError(f"global batch {batch_size} is not divisible by the {world_size} ranks")
        self.urls, self.record, self.batch_size = list(urls), record, batch_size
        self.seed, self.augment, self.train = seed, augment if train else None, train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.rank, self.world_size = rank, world_size
        workers = max(1, num_workers)
        if split == "auto":
            split = "shards" if len(self.urls) >= world_size * workers else "global"
        if split not in ("global", "shards", "resampled"):
            raise DataError(f"unknown split mode {split!r}: auto, global, shards or resampled")
        if split == "shards" and len(self.urls) < world_size * workers:
            raise DataError(f"{len(self.urls)} shards cannot feed {world_size} ranks x {workers} workers "
                            "(a rank or worker without shards would stall DDP): use split=global or resampled")
        if not train:
            split = "shards" if len(self.urls) >= world_size * workers else "global"
        self.split, self.num_workers, self.skip_batches = split, num_workers, skip_batches

    # the local batch this rank trains on; in `global` mode the stream forms the global batch
    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world_size

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        if self.split == "resampled":
            rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}")
            return [rng.choice(self.urls) for _ in range(len(self.urls))]
        order = list(self.urls)
        if self.train:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        if self.split == "shards":
            order = order[self.rank::self.world_size]
        return order[worker::workers]

    def _raw(self, worker: int, workers: int) -> Iterator[tuple[int, dict, dict]]:
        epoch = 0
        while True:
            urls = self._shards(epoch, worker, workers)
            n = 0
            if urls:
                ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                    empty_check=False)
                for raw in ds:
                    n += 1
                    yield epoch, raw, S.check_sample(raw, self.record)
            if not self.train:
                return
            if n == 0:
                raise DataError(f"epoch {epoch}: shards {urls[:3]}... hold no samples")
            epoch += 1

    def _shuffled(self, it, worker: int):
        if not self.shuffle_buffer:
            yield from it
            return
        rng = random.Random(f"{self.seed}:shuffle:{self.rank if self.split != 'global' else 0}:{worker}")
        buf = []
        for item in it:
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        worker, workers = self._worker()
        # replaying `skip_batches` consumed batches: the DataLoader takes batches from its workers round-robin
        # starting at worker 0, so every worker skips k // W and `loader` drops the first k % W it yields
        skip = self.skip_batches // workers
        size = self.batch_size if self.split == "global" else self.local_batch
        buckets: dict[tuple, list] = {}
        emitted = 0
        for item in self._shuffled(self._raw(worker, workers), worker):
            res = item[2]["resolution"]
            bucket = buckets.setdefault((int(res[0]), int(res[1])), [])
            bucket.append(item)
            if len(bucket) == size:
                del buckets[(int(res[0]), int(res[1]))]
                emitted += 1
                if emitted > skip:
                    yield self._decode(bucket)
        if not self.train:  # a last, partial batch per shape: validation sees every sample
            for key in sorted(buckets):
                yield self._decode(buckets[key])

    def _decode(self, bucket: list) -> dict:
        if self.split == "global" and self.train:
            bucket = bucket[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        items = [decode_sample(raw, doc, self.record, self.augment, self.seed, epoch) for epoch, raw, doc in bucket]
        return collate(items, [doc["key"] for _, _, doc in bucket])


def loader(dataset: CuratedShards, num_workers: int = 0) -> DataLoader:
    """Batches come formed from the dataset (batch_size=None); workers keep round-robin order.
    Workers are capped at the shards each one can own (an idle worker would end the round-robin)."""
    if dataset.split != "resampled":
        per_rank = len(dataset.urls) // (dataset.world_size if dataset.split == "shards" else 1)
        num_workers = min(num_workers, max(per_rank, 1)) if num_workers > 1 else num_workers
    dl = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                    persistent_workers=False, prefetch_factor=4 if num_workers else None)
    return _Skipping(dl, dataset.skip_batches % max(1, num_workers))


class _Skipping:
    def __init__(self, dl: DataLoader, drop: int):
        self.dl, self.drop = dl, drop

    def __iter__(self):
        it = iter(self.dl)
        for _ in range(self.drop):
            next(it)
        yield from it


def open_record(path: str | Path | None, urls: list[str]) -> S.Conditioning:
    if path is None:
        raise DataError(f"no conditioning record beside {urls[:1]}: pass --conditioning OUT/conditioning.json")
    return S.read_record(path)

