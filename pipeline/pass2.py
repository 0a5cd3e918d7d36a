"""Pass 2, one input file that has kept items at a time: re-read the file, decode only its kept items
(the same validation as pass 1, checked against pass 1's pixel hash), caption and encode them in
chunks of consecutive kept items, and stream the samples into shard parts. Each kept input also gets
the SSCD descriptor of its training crop (`OUT/crop_embeddings/`), the view a generation is compared
with in the memorization check (SSCD of the whole original is what dedup used).

Where a sample goes is fixed before pass 2 starts: the kept inputs of a split, ordered by (input file,
reading order), are cut into shards of `shard_size`; `offsets[(file_index, split)]` is where this
file's kept inputs of that split begin. So the shards do not depend on the runner or the worker
count, and no sample crosses a shuffle. A kept input that cannot be re-read as pass 1 saw it becomes a
`failed:reread` row; a chunk whose captioning or encoding raised, `failed:caption` / `failed:encode`.

What a sample holds follows `[pipeline] outputs`: "sd3" (latents and text encodings, `encode_sample`),
"images" (the training view, captions and json in img2dataset's layout, `image_members`), or both. A
model a run does not need is never loaded: no captioner when `[models] captioner = ""` (the original
captions are kept), no autoencoder or text encoder without "sd3".

Edit triplets (`Pass2Settings.edit`) become editing samples (`formats/edit_shards.py`): the edited
image's posterior, the aligned source's posterior and the instruction's encodings; no captioning.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from flowcurate.captioning.handler import CaptionModelHandler
from flowcurate.formats import edit_shards
from flowcurate.formats.images import ImageRejected, encode_view, image_extension
from flowcurate.formats.manifest import FAILED_PREFIX, score_column
from flowcurate.formats.shards import SPLITS, encode_sample, image_members, sample_json, shard_name
from flowcurate.pipeline.handlers import EncodeInput, EncodeModelHandler, ModelSlot, SSCDModelHandler
from flowcurate.pipeline.progress import Progress, Timer
from flowcurate.pipeline.read import EditNames, read_items
from flowcurate.pipeline.records import Kept, manifest_row, ordinal_of
from flowcurate.pipeline.validate import validate, validate_pair
from flowcurate.pipeline.write import PASS2_DIR, PartWriter, join, read_file, write_file

log = logging.getLogger(__name__)
PARTS = "parts"
CROPS = "crops"


@dataclass(frozen=True)
class Pass2Settings:
    out: str
    resolution: int
    min_size: int
    max_aspect: float
    max_pixels: int
    buckets: tuple | None
    chunk: int  # kept items per captioning / encoding batch
    shard_size: int
    store_dtype: str
    captioner: CaptionModelHandler | None  # None: no captioning, the original captions are kept
    encoder: EncodeModelHandler | None  # None: no "sd3" output
    sscd: SSCDModelHandler  # the training crop's descriptor
    columns: tuple[str | None, str | None, str | None] = ("key", None, None)  # as Pass1Settings.columns
    first_shard: tuple[tuple[str, int], ...] = ()  # (split, first shard number): after earlier outputs'
    images: tuple | None = None  # "images" output: (view format "jpg" | "png", JPEG quality, keep original)
    clip_scores: tuple = ()  # clip_score filters (pipeline/filters.py): the synthetic caption's score, recorded
    edit: EditNames | None = None  # edit triplets -> editing samples

    def identity(self) -> tuple:
        """What decides a sample's members and rows besides its item and the conditioning (part of the
        digest that lets a rerun reuse a finished file: other outputs must not reuse stale parts)."""
        return (self.encoder is not None, self.captioner is not None, self.images, self.store_dtype,
                self.clip_scores, self.edit)


def shard_positions(file_index: int, kept: list[Kept], offsets: dict, shard_size: int,
                    first: dict | None = None) -> dict[int, str]:
    """id -> shard name: the file's kept items of each split, in reading order, continue that split's
    running position at `offsets[(file_index, split)]`; shard numbers start at `first[split]` (after
    the shards of earlier outputs, with --previous)."""
    out = {}
    for split in SPLITS:
        base, start = offsets.get((file_index, split), 0), (first or {}).get(split, 0)
        for rank, k in enumerate(sorted((k for k in kept if k.split == split), key=lambda k: k.id)):
            out[k.id] = shard_name(split, start + (base + rank) // shard_size)
    return out


def _failed(k: Kept, stage: str) -> dict:
    return manifest_row(k.key, k.source, "rejected", reason=f"{FAILED_PREFIX}{stage}", width=k.width,
                        height=k.height, cluster=k.cluster, scores=k.scores)


class Pass2(beam.DoFn):
    """(file_index, [Kept]) + side inputs (input files, offsets, conditioning hash) -> kept manifest rows,
    (shard, (file_index, part path, samples)) on the 'parts' output and crop-descriptor rows on 'crops'."""

    def __init__(self, settings: Pass2Settings):
        self.s = settings

    def setup(self):
        s = self.s
        # only the models this run's outputs need: none of a kind that is switched off
        self.captioner = ModelSlot(s.captioner) if s.captioner is not None else None
        self.encoder = ModelSlot(s.encoder) if s.encoder is not None else None
        self.sscd = ModelSlot(s.sscd)
        self.clip_scores = [(f, ModelSlot(f.handler())) for f in s.clip_scores] if s.captioner is not None else []
        for slot in (self.captioner, self.encoder, self.sscd, *(slot for _, slot in self.clip_scores)):
            if slot is not None:
                slot.load()
        self.progress = Progress.get("pass 2", ("files", "kept", "written", "failed", "reused"))

    def process(self, element, files, offsets, conditioning):
        file_index, kept = element
        with Timer(self.progress):
            done = self._done_path(file_index, kept, files, offsets, conditioning)
            outputs = self._reusable(done)
            if outputs is not None:  # a killed run's finished file: its parts are still in place
                self.progress.add("kept", len(kept))
                self.progress.add("written", sum(1 for tag, row in outputs if tag is None and row.get("status") == "kept"))
                self.progress.add("reused", len(kept))
                self.progress.add("files")
            else:
                outputs = []
                for o in self._process(file_index, kept, files, offsets, conditioning):
                    outputs.append((o.tag, o.value) if isinstance(o, beam.pvalue.TaggedOutput) else (None, o))
                write_file(done, pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))
            for tag, value in outputs:
                yield value if tag is None else beam.pvalue.TaggedOutput(tag, value)

    def _done_path(self, file_index: int, kept: list, files, offsets, conditioning) -> str:
        """OUT/.pass2/done/<file identity>-<digest>.pkl: what pass 2 produced for this file, named by
        everything that decides it (the kept items, their shards, the conditioning, what the samples hold)."""
        shards = shard_positions(file_index, kept, offsets, self.s.shard_size, dict(self.s.first_shard))
        what = repr((sorted(kept, key=lambda k: k.id), sorted(shards.items()), conditioning, self.s.identity()))
        digest = hashlib.sha256(what.encode()).hexdigest()[:24]
        return join(self.s.out, PASS2_DIR, "done", f"{files[file_index].identity()}-{digest}.pkl")

    @staticmethod
    def _reusable(done: str) -> list | None:
        """The stored outputs of a finished file, if every part they name is still on disk."""
        if not FileSystems.exists(done):
            return None
        try:
            outputs = pickle.loads(read_file(done))
        except Exception as e:  # noqa: BLE001  (a damaged record: compute the file again)
            log.warning("%s: unreadable, the file is processed again: %r", done, e)
            return None
        parts = [value[1][1] for tag, value in outputs if tag == PARTS]
        return outputs if all(FileSystems.exists(p) for p in parts) else None

    def _process(self, file_index: int, kept: list, files, offsets, conditioning):
        s = self.s
        path, root = files[file_index][:2]
        wanted = {ordinal_of(k.id): k for k in kept}
        shards = shard_positions(file_index, kept, offsets, s.shard_size, dict(s.first_shard))
        writers: dict[str, PartWriter] = {}
        chunk: list = []
        self.progress.add("kept", len(kept))
        try:
            for ordinal, raw in enumerate(read_items(path, root, s.columns, s.edit)):
                k = wanted.pop(ordinal, None)
                if k is None:
                    continue
                try:
                    kw = dict(resolution=s.resolution, min_size=s.min_size, max_aspect=s.max_aspect,
                              max_pixels=s.max_pixels, buckets=list(s.buckets) if s.buckets else None,
                              sscd=s.sscd.preprocess, sscd_crop=True)
                    v = validate_pair(raw.source_image, raw.image, **kw) if s.edit else validate(raw.image, **kw)
                except (ImageRejected, TypeError, ValueError) as e:
                    log.warning("%s: no longer decodes as in pass 1: %r", k.source, e)
                    v = None
                if v is None or v.pixel_hash != k.pixel_hash:
                    self.progress.add("failed")
                    yield _failed(k, "reread")
                    continue
                keep_bytes = s.images is not None and s.images[2]  # the original's bytes go into the sample
                chunk.append((k, raw if keep_bytes else raw._replace(image=None, source_image=None), v))  # else text fields only
                if len(chunk) >= s.chunk:
                    yield from self._finish(chunk, file_index, shards, writers, conditioning)
                    chunk = []
        except Exception as e:  # noqa: BLE001  (the file changed or went away since pass 1)
            log.warning("%s: re-reading stopped: %r", path, e)
        if chunk:
            yield from self._finish(chunk, file_index, shards, writers, conditioning)
        for k in wanted.values():  # kept in pass 1, not found again
            self.progress.add("failed")
            yield _failed(k, "reread")
        for w in writers.values():
            yield beam.pvalue.TaggedOutput(PARTS, w.close())
        self.progress.add("files")

    def _finish(self, chunk: list, file_index: int, shards: dict, writers: dict, conditioning: str):
        s = self.s
        texts = self._captions(chunk)
        if texts is None:  # the captioner failed on this chunk
            self.progress.add("failed", len(chunk))
            yield from (_failed(k, "caption") for k, _, _ in chunk)
            return
        syn_scores: list[list] = [[] for _ in chunk]
        for f, slot in self.clip_scores:  # the synthetic caption's clip_score: recorded, never filtering
            try:
                got = slot.run([(v.image, syn) for (_, _, v), (_, syn, _) in zip(chunk, texts)])
            except Exception as e:  # noqa: BLE001
                log.warning("clip_score %s failed on a chunk of %d: %r", f.name, len(chunk), e)
                self.progress.add("failed", len(chunk))
                yield from (_failed(k, f"filter:{f.name}") for k, _, _ in chunk)
                return
            for row, score in zip(syn_scores, got):
                row.append((score_column(f.name, synthetic=True), score))
        try:
            encoded = [None] * len(chunk)
            if self.encoder is not None:  # without a captioner the syn variant encodes the original caption
                encoded = self.encoder.run([EncodeInput(v.image, orig, syn if syn is not None else orig, v.source)
                                            for (_, _, v), (orig, syn, _) in zip(chunk, texts)])
            crops = self.sscd.run([v.sscd for _, _, v in chunk])
        except Exception as e:  # noqa: BLE001
            log.warning("encoding failed on a chunk of %d: %r", len(chunk), e)
            self.progress.add("failed", len(chunk))
            yield from (_failed(k, "encode") for k, _, _ in chunk)
            return
        for (k, raw, v), (orig, syn, notes), e, crop, scores in zip(chunk, texts, encoded, crops, syn_scores):
            shard = shards[k.id]
            split = shard.split("-", 1)[0]
            w = writers.get(split)
            if w is None or w.shard != shard:
                if w is not None:
                    yield beam.pvalue.TaggedOutput(PARTS, w.close())
                w = writers[split] = PartWriter(s.out, shard, file_index)
            meta = {"source": k.source, "width": v.width, "height": v.height, "crop": list(v.crop),
                    "resolution": list(v.resolution)}
            meta.update({"instruction": orig} if s.edit else {"caption": {"orig": orig, "syn": syn}})
            if raw.url:  # source metadata as the input gave it (img2dataset's url), only when there is one
                meta["url"] = raw.url
            w.add(self._sample(k.key, raw, v, e, meta, conditioning))
            notes = list(notes) + (["caption_truncated_77"] if e is not None and e.truncated else [])
            yield manifest_row(k.key, k.source, "kept", cluster=k.cluster, width=v.width, height=v.height,
                               caption_original=raw.caption, caption_synthetic=syn, notes=notes, shard=shard,
                               url=raw.url, scores=k.scores, **dict(scores))
            left, top, right, bottom = v.crop
            yield beam.pvalue.TaggedOutput(CROPS, {"key": k.key, "embedding": crop.astype("float32").tolist(),
                                                   "width": right - left, "height": bottom - top})
        self.progress.add("written", len(chunk))

    def _captions(self, chunk: list) -> list[tuple[str, str | None, tuple[str, ...]]] | None:
        """(original, synthetic or None, notes) per item; None when the captioner raised. An item without
        an original caption takes the synthetic one as both (or "" when nothing captions it)."""
        captions = [None] * len(chunk)
        if self.captioner is not None:
            try:
                captions = self.captioner.run([(v.image, raw.caption) for _, raw, v in chunk])
            except Exception as e:  # noqa: BLE001  (a failed chunk: its items get dead-letter rows)
                log.warning("captioning failed on a chunk of %d: %r", len(chunk), e)
                return None
        texts = []
        for (_, raw, _), cap in zip(chunk, captions):
            notes = list(cap.notes) if cap is not None else []
            syn = cap.text if cap is not None else None
            if not raw.caption:
                notes.append("orig_caption_missing")
            texts.append((raw.caption or syn or "", syn, tuple(dict.fromkeys(notes))))
        return texts

    def _sample(self, key: str, raw, v, e, meta: dict, conditioning: str | None) -> dict:
        """One sample's members: the arrays (with "sd3"), the img2dataset members (with "images"), the json."""
        s = self.s
        if s.edit is not None:
            return edit_shards.encode_edit_sample(key, e.latent_mean, e.latent_logvar, e.source_mean, e.source_logvar,
                                                  e.encodings[edit_shards.VARIANT], meta, conditioning, s.store_dtype)
        if e is not None:
            sample = encode_sample(key, e.latent_mean, e.latent_logvar, e.encodings, meta, conditioning,
                                   s.store_dtype)
        else:
            sample = {"__key__": key, "json": sample_json(key, meta, None)}
        if s.images is not None:
            fmt, quality, keep_original = s.images
            original = (image_extension(raw.image), raw.image) if keep_original else None
            sample.update(image_members(encode_view(v.image, fmt, quality), fmt, meta["caption"], original))
        return sample
