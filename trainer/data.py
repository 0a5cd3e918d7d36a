"""Curated shards -> training batches: read with webdataset, validate against the conditioning record,
pick a caption, drop encoders, assemble the context, sample the latent, batch by latent shape.

The stream is endless and deterministic, so a resumed run replays it exactly:
- epoch e visits the shards in an order drawn from (seed, e); each DataLoader worker reads every W-th
  of them (after the per-rank split when ranks read disjoint shards);
- a seeded shuffle buffer and per-shape buckets (aspect buckets: a batch holds one latent shape) carry
  over from epoch to epoch, so no sample is dropped at an epoch end;
- each sample's random choices (caption variant, encoder drops, latent noise) come from a generator
  seeded by (seed, epoch, key), not from the stream position;
- the data position (per rank and loader worker: epoch, shard order, index of the shard being read,
  byte offset of its next sample, shuffle draws made, and the [epoch, shard, offset, key] of every
  sample held in the shuffle buffer and the aspect buckets) is small JSON saved in each checkpoint; a
  resume opens the current shard at the saved offset and re-reads only the held samples, so it costs
  at most one shuffle buffer plus one shard per worker, however far the run had gone.

Distributed modes (`split`): `global` (every rank reads the same stream, forms the global batch and
keeps its slice: the same global batches as one process, used when there are few shards), `shards`
(ranks read disjoint shards: the scalable default when every rank and worker gets at least one), and
`resampled` (every worker draws shards with replacement, WebDataset's multi-node mode; ranks never
run dry). `auto` picks `shards` when there are enough shards, else `global`.
"""

from __future__ import annotations

import glob
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flowcurate.formats import shards as S
from flowcurate.formats.hashing import hasher, stable_hash
from flowcurate.models.autoencoder import to_model_space


class DataError(S.ShardFormatError):
    """Unusable training data: no shards, no samples, a record that does not match."""


# ------------------------------------------------------------------------------------------------------
# Where the shards and the conditioning record are

def resolve_shards(spec: str, split: str = "train", read_index=S.read_index) -> tuple[list[str], Path | None]:
    """`spec`: a pipeline output folder (`OUT`, using `OUT/shards/index.json`), a shards folder, brace
    notation (`out/shards/train-{000000..000031}.tar`), a glob, or URLs joined by `::`. Returns the shard
    URLs of `split` and the conditioning record found beside them (None when none is). `read_index`
    reads and checks an index (the editing trainer passes `formats.edit_shards.read_edit_index`)."""
    path = Path(spec)
    if path.is_dir():
        shards_dir = path / "shards" if (path / "shards" / S.INDEX_JSON).exists() else path
        index = read_index(shards_dir)
        if "sd3" not in index.get("outputs", ["sd3"]):  # formats/shards.py, index_doc
            raise DataError(f"{shards_dir} holds images only ([pipeline] outputs = {index['outputs']}): no "
                            "latents or text encodings to train on; curate with outputs = [\"sd3\"] (or both)")
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


def model_space_latent(mean: np.ndarray, logvar: np.ndarray, record: S.Conditioning,
                       rng: np.random.Generator | None = None) -> torch.Tensor:
    """A stored posterior (C, h, w) -> the model-space latent (float32): z ~ N(mean, exp(logvar)) drawn
    from `rng`, or the mean without one, then `(z - shift) * scale` with the record's AE values."""
    z = mean.astype(np.float32)
    if rng is not None:
        z = z + np.exp(0.5 * logvar.astype(np.float32)) * rng.standard_normal(z.shape, dtype=np.float32)
    ae = record.json["autoencoder"]
    return to_model_space(torch.from_numpy(z), ae["scaling_factor"], ae["shift_factor"])


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
    latent = model_space_latent(arrays["latent_mean.npy"], arrays["latent_logvar.npy"], record,
                                rng if aug is not None and aug.sample_latent else None)
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
# Reading shards from a byte offset

BLOCK = 512  # tar blocks: every header and every payload (padded) is a whole number of them


def _plain_local_tar(url: str) -> bool:
    """A local, uncompressed tar: its byte offsets are seekable file positions."""
    return "://" not in url and not url.startswith("pipe:") and url.endswith(".tar") and Path(url).is_file()


def read_samples(url: str, offset: int = 0) -> Iterator[tuple[dict, int, int]]:
    """The samples of a WebDataset tar from byte `offset` (where a sample's first header starts, 0 for
    the whole shard): (raw members as webdataset groups them, start, end), `end` being where the
    next sample starts. A local plain tar is opened at `offset` (nothing before it is read); another
    URL (remote, compressed) is streamed from its start and the members before `offset` are skipped
    without reading their payload."""
    seek = _plain_local_tar(url)
    if seek and offset >= os.path.getsize(url):  # past the last member of a tar without end blocks
        return
    if seek:
        fh, base, mode = open(url, "rb"), offset, "r|"
        fh.seek(offset)
    else:
        fh, base, mode = wds.gopen(url, "rb"), 0, "r|*"
    try:
        with tarfile.open(fileobj=fh, mode=mode) as tar:
            current, start, end = None, offset, offset
            for member in tar:
                member_end = base + member.offset_data + -(-member.size // BLOCK) * BLOCK
                tar.members = []  # a long shard would keep every TarInfo otherwise
                if base + member.offset < offset:
                    continue
                prefix, suffix = wds.tariterators.base_plus_ext(member.name)
                if not member.isreg() or prefix is None or re.match(r"__[^/]*__($|/)", member.name):
                    end = member_end
                    continue
                if current is not None and prefix != current["__key__"]:
                    yield current, start, end
                    current, start = None, end
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                current[suffix.lower()] = tar.extractfile(member).read()
                end = member_end
            if current is not None:
                yield current, start, end
    finally:
        fh.close()


# ------------------------------------------------------------------------------------------------------
# The stream

@dataclass
class _Item:
    """One sample in a worker's stream: where it was read (so a data position can name it) and its members."""

    epoch: int
    shard: int  # index into CuratedShards.urls
    start: int  # byte offset of its first tar header
    raw: dict
    doc: dict

    def entry(self) -> list:
        """[epoch, shard, byte offset, key]: what a data position keeps of a buffered sample."""
        return [self.epoch, self.shard, self.start, self.doc["key"]]


class CuratedShards(IterableDataset):
    """Endless training batches (or one pass over validation shards with `train=False`).

    batch_size is the *global* batch; each rank receives batch_size // world_size samples.

    `position` (what `BatchStream.position()` returned, one rank's) resumes the stream where it was:
    every worker opens its current shard at the saved byte offset and re-reads only the samples its
    shuffle buffer and aspect buckets held, so resuming costs the same at step 10 as at step 10^6.
    `start_epoch` (without `position`) starts at that epoch's beginning with empty buffers: the
    restart after a deliberate change of the data-order settings."""

    def __init__(self, urls: list[str], record: S.Conditioning, batch_size: int, *, seed: int = 0,
                 augment: Augment | None = Augment(), train: bool = True, shuffle_buffer: int = 256,
                 rank: int = 0, world_size: int = 1, split: str = "auto", num_workers: int = 0,
                 position: dict | None = None, start_epoch: int = 0):
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
        self.split, self.num_workers = split, num_workers
        self.position, self.start_epoch = position, start_epoch
        if position is not None and position.get("shards") != shard_list_hash(self.urls):
            raise DataError("the shard list differs from the one the data position was saved with "
                            f"({position.get('shard_count')} shards then, {len(self.urls)} now): the saved "
                            "offsets would point into other shards")

    # the local batch this rank trains on; in `global` mode the stream forms the global batch
    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world_size

    def _shards(self, epoch: int, worker: int, workers: int) -> list[int]:
        """This worker's shards for `epoch`, as indices into `urls`."""
        if self.split == "resampled":
            rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}")
            return [rng.randrange(len(self.urls)) for _ in range(len(self.urls))]
        order = list(range(len(self.urls)))
        if self.train:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        if self.split == "shards":
            order = order[self.rank::self.world_size]
        return order[worker::workers]

    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader takes batches round-robin from physical worker 0: after a resume, physical worker
        # p plays the saved worker (p + next_worker) % W, so the round-robin continues where it stopped
        saved = None
        if self.position is not None:
            if len(self.position["workers"]) != workers:
                raise DataError(f"the data position was saved with {len(self.position['workers'])} loader "
                                f"workers, this loader has {workers}")
            worker = (physical + self.position["next_worker"]) % workers
            saved = self.position["workers"][worker]
        else:
            worker = physical
        yield from _WorkerStream(self, worker, workers, saved).batches()

    def check_sample(self, raw: dict) -> dict:
        """A raw sample's parsed json after validation against the record (the editing stream,
        trainer/edit.py, checks its own format here)."""
        return S.check_sample(raw, self.record)

    def _decode(self, bucket: list[_Item]) -> dict:
        if self.split == "global" and self.train:
            bucket = bucket[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        items = [decode_sample(it.raw, it.doc, self.record, self.augment, self.seed, it.epoch) for it in bucket]
        return collate(items, [it.doc["key"] for it in bucket])


def shard_list_hash(urls: list[str]) -> str:
    """Names the shard list a data position indexes into (file names, so a moved folder still matches)."""
    return f"{stable_hash('sample', 'shards:' + ':'.join(u.rsplit('/', 1)[-1] for u in urls)):016x}"


class _WorkerStream:
    """One loader worker's part of the stream, and its position: the epoch, this worker's shard order in
    it, the index of the shard being read, the byte offset of its next sample, the shuffle draws made,
    and the samples held in the shuffle buffer and the aspect buckets (as [epoch, shard, offset, key]).

    The shuffle draw n comes from a hash of (seed, rank, worker, n), not from a generator's state, so a
    position needs only the count. Each sample's own random choices are seeded by (seed, epoch, key)."""

    def __init__(self, ds: CuratedShards, worker: int, workers: int, saved: dict | None):
        self.ds, self.worker, self.workers = ds, worker, workers
        self.draw_hash = hasher("sample")
        self.stream_rank = ds.rank if ds.split != "global" else 0
        self.samples_read = 0  # tar samples parsed by this worker in this process: a resume's cost
        self.buffer: list[_Item] = []
        self.buckets: dict[tuple[int, int], list[_Item]] = {}
        self.batches_out = 0
        if saved is None:
            self.epoch, self.shard_index, self.offset, self.draws = ds.start_epoch, 0, 0, 0
            self.order = self.ds._shards(self.epoch, worker, workers)
        else:
            self.epoch, self.shard_index, self.offset = saved["epoch"], saved["shard_index"], saved["offset"]
            self.order, self.draws, self.batches_out = list(saved["shard_order"]), saved["draws"], saved["batches"]
            held = self._refill([*saved["buffer"], *(e for _, entries in saved["buckets"] for e in entries)])
            self.buffer = [held[tuple(e[:3])] for e in saved["buffer"]]
            for shape, entries in saved["buckets"]:
                self.buckets[tuple(shape)] = [held[tuple(e[:3])] for e in entries]

    def _refill(self, entries: list[list]) -> dict[tuple[int, int, int], _Item]:
        """Re-read the samples a position held, shard by shard in offset order: a local tar is opened at
        each sample's byte offset; another URL is streamed once, from its first held sample on."""
        found: dict[tuple[int, int, int], _Item] = {}
        by_shard: dict[int, list[list]] = {}
        for e in {tuple(e[:3]): e for e in entries}.values():  # resampled epochs may hold a sample twice
            by_shard.setdefault(e[1], []).append(e)
        for shard, wanted in sorted(by_shard.items()):
            url = self.ds.urls[shard]
            wanted.sort(key=lambda e: e[2])
            if _plain_local_tar(url):
                reads = (next(read_samples(url, e[2]), (None, e[2], e[2])) for e in wanted)
            else:
                offsets = {e[2] for e in wanted}
                reads = (r for r in read_samples(url, wanted[0][2]) if r[1] in offsets)
            for (epoch, _, start, key), (raw, got, _) in zip(wanted, reads):
                self.samples_read += raw is not None
                doc = self.ds.check_sample(raw) if raw is not None and got == start else None
                if doc is None or doc["key"] != key:
                    raise DataError(f"{url} at byte {start}: expected sample {key} of the saved data position, "
                                    f"found {doc and doc['key']}: the shard changed since the checkpoint")
                found[(epoch, shard, start)] = _Item(epoch, shard, start, raw, doc)
        return found

    def _raw(self) -> Iterator[_Item]:
        """Samples from the position on: the rest of the current shard, then the next ones, epoch after
        epoch (training) or until the shards end (validation). Updates the position as it goes."""
        while True:
            read_in_epoch = self.shard_index > 0 or self.offset > 0
            while self.shard_index < len(self.order):
                shard = self.order[self.shard_index]
                for raw, start, end in read_samples(self.ds.urls[shard], self.offset):
                    self.samples_read += 1
                    read_in_epoch = True
                    self.offset = end
                    yield _Item(self.epoch, shard, start, raw, self.ds.check_sample(raw))
                self.shard_index, self.offset = self.shard_index + 1, 0
            if not self.ds.train:
                return
            if not read_in_epoch:
                urls = [self.ds.urls[i] for i in self.order[:3]]
                raise DataError(f"epoch {self.epoch}: shards {urls}... hold no samples")
            self.epoch, self.shard_index, self.offset = self.epoch + 1, 0, 0
            self.order = self.ds._shards(self.epoch, self.worker, self.workers)

    def _shuffled(self) -> Iterator[_Item]:
        size = self.ds.shuffle_buffer
        for item in self._raw():
            if not size:
                yield item
                continue
            self.buffer.append(item)
            if len(self.buffer) >= size:
                n = self.draw_hash(f"shuffle:{self.ds.seed}:{self.stream_rank}:{self.worker}:{self.draws}")
                self.draws += 1
                i = n % len(self.buffer)
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                yield self.buffer.pop()

    def position(self) -> dict:
        """Where this worker stands after the batches it has yielded (JSON: keys and offsets, no tensors)."""
        return {"epoch": self.epoch, "shard_order": list(self.order), "shard_index": self.shard_index,
                "offset": self.offset, "draws": self.draws, "batches": self.batches_out,
                "buffer": [it.entry() for it in self.buffer],
                "buckets": [[list(shape), [it.entry() for it in items]] for shape, items in self.buckets.items()]}

    def batches(self) -> Iterator[dict]:
        ds = self.ds
        size = ds.batch_size if ds.split == "global" else ds.local_batch
        for item in self._shuffled():
            res = item.doc["resolution"]
            shape = (int(res[0]), int(res[1]))
            bucket = self.buckets.setdefault(shape, [])
            bucket.append(item)
            if len(bucket) == size:
                del self.buckets[shape]
                self.batches_out += 1
                batch = ds._decode(bucket)
                if ds.train:
                    batch.update(worker=self.worker, samples_read=self.samples_read, position=self.position())
                yield batch
        if not ds.train:  # a last, partial batch per shape: validation sees every sample
            for shape in sorted(self.buckets):
                yield ds._decode(self.buckets[shape])


def loader(dataset: CuratedShards, num_workers: int = 0, pin_memory: bool = False) -> BatchStream:
    """Batches come formed from the dataset (batch_size=None); workers keep round-robin order.
    Workers are capped at the shards each one can own (an idle worker would end the round-robin).
    `pin_memory` (for a CUDA trainer) puts the batches in page-locked memory, so copies to the GPU
    with `non_blocking=True` overlap the step instead of stalling it."""
    if dataset.split != "resampled":
        per_rank = len(dataset.urls) // (dataset.world_size if dataset.split == "shards" else 1)
        num_workers = min(num_workers, max(per_rank, 1)) if num_workers > 1 else num_workers
    dl = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                    persistent_workers=False, prefetch_factor=4 if num_workers else None)
    return BatchStream(dl, dataset, max(1, num_workers))


class BatchStream:
    """The DataLoader's batches, keeping the data position of what the caller has taken: each training
    batch carries its worker's position after it (workers run ahead, so only the consumer knows which
    batches were used), and `position()` is this rank's, ready for a checkpoint."""

    def __init__(self, dl: DataLoader, dataset: CuratedShards, workers: int):
        self.dl, self.dataset, self.workers = dl, dataset, workers
        saved = dataset.position
        self.next_worker = saved["next_worker"] if saved else 0
        self.batches = saved["batches"] if saved else 0
        self.worker_positions: list[dict | None] = list(saved["workers"]) if saved else [None] * workers
        # tar samples each worker had parsed when it yielded its latest / its first batch in this process:
        # on a resume, `first_samples_read` is what restoring the position cost (the held samples re-read,
        # plus those the first batch needed), the same at step 10 as at step 10^6
        self.samples_read: dict[int, int] = {}
        self.first_samples_read: dict[int, int] = {}

    def __iter__(self):
        for batch in self.dl:
            if "position" in batch:
                worker = batch.pop("worker")
                self.worker_positions[worker] = batch.pop("position")
                self.samples_read[worker] = batch.pop("samples_read")
                self.first_samples_read.setdefault(worker, self.samples_read[worker])
                self.next_worker = (worker + 1) % self.workers
                self.batches += 1
            yield batch

    def position(self) -> dict:
        """This rank's data position (None for a worker that has not yielded yet: it starts afresh)."""
        return {"batches": self.batches, "next_worker": self.next_worker, "workers": list(self.worker_positions),
                "shards": shard_list_hash(self.dataset.urls), "shard_count": len(self.dataset.urls)}


def open_record(path: str | Path | None, urls: list[str]) -> S.Conditioning:
    if path is None:
        raise DataError(f"no conditioning record beside {urls[:1]}: pass --conditioning OUT/conditioning.json")
    return S.read_record(path)

