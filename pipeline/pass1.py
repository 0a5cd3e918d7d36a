"""Pass 1, one input file at a time, in one DoFn (so it is fused by construction; nothing in it crosses
a shuffle): read -> decode and validate -> filters -> pixel hash -> SSCD, in chunks of consecutive
valid items of the file -> one small `Item` per input (key, source, sizes, crop, pixel hash, SSCD
descriptor, original caption, reason, filter scores).

Chunks are formed inside the file, so a model batch does not depend on the runner or the worker count,
and at most one chunk of decoded pixels is held at a time. Every input gets exactly one `Item`: a
rejected one carries its reason (`too_small`, `filtered:aesthetic`, `failed:sscd`, ...). Edit
triplets (`Pass1Settings.edit`) are validated as aligned pairs (`validate_pair`); the filters and
SSCD see the edited image, so dedup runs on the edits.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from flowcurate.formats.images import ImageRejected
from flowcurate.formats.manifest import FAILED_PREFIX, FILTERED_PREFIX, UNREADABLE_ARCHIVE_TAIL
from flowcurate.formats.tars import sanitize_key
from flowcurate.pipeline.filters import CLIP_SCORE, Filter
from flowcurate.pipeline.filters import METRICS_NAMESPACE as FILTER_METRICS
from flowcurate.pipeline.handlers import ModelSlot, SSCDModelHandler
from flowcurate.pipeline.progress import Progress, Timer
from flowcurate.pipeline.read import EditNames, read_items
from flowcurate.pipeline.records import Item, item_id, items_from_parquet, items_to_parquet
from flowcurate.pipeline.validate import Valid, validate, validate_pair
from flowcurate.pipeline.write import join, read_file, write_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pass1Settings:
    resolution: int
    min_size: int
    max_aspect: float
    max_pixels: int
    buckets: tuple | None  # aspect buckets (H, W), or None for the centred square
    sscd_location: str
    sscd_preprocess: object  # flowcurate.models.sscd.SSCDPreprocess
    chunk: int  # valid items per model batch
    device: str = "auto"
    sscd_sha256: str | None = None  # expected digest of a downloaded SSCD file (checked on every worker)
    filters: tuple[Filter, ...] = ()
    # Parquet key, image, caption columns; None: found per file (pipeline/read.py, parquet_columns)
    columns: tuple[str | None, str | None, str | None] = ("key", None, None)
    edit: EditNames | None = None  # edit triplets: validated as pairs, the edited image filtered and embedded


class _Pending:
    """A valid item waiting for its chunk's models."""

    __slots__ = ("id", "key", "source", "caption", "valid", "scores")

    def __init__(self, id_, raw, valid: Valid):
        self.id, self.key, self.source, self.caption, self.valid = id_, raw.key, raw.source, raw.caption, valid
        self.scores: list[tuple[str, float]] = []

    def item(self, reason: str | None = None, embedding: bytes | None = None) -> Item:
        v = self.valid
        return Item(self.id, self.key, self.source, reason, v.width, v.height, tuple(v.crop), v.pixel_hash,
                    embedding, self.caption, tuple(self.scores))


class Pass1(beam.DoFn):
    """(file_index, InputFile) -> one `Item` per input of that file.

    With `records` (a folder), each file's Items are also written there, atomically, named by the
    file's identity (path, size, modification time), once the whole file is done; a file whose
    records are already there is not read again (a rerun after a kill, or an unchanged input)."""

    def __init__(self, settings: Pass1Settings, records: str | None = None):
        self.s, self.records = settings, records
        self.sscd = None

    def setup(self):
        # score distributions per filter (score * 1000), visible in the runner's metrics
        self.score_metrics = {f.name: beam.metrics.Metrics.distribution(FILTER_METRICS, f.name) for f in self.s.filters}
        self.progress = Progress.get("pass 1", ("files", "inputs", "valid", "rejected", "embedded", "reused"))

    def _load_models(self):
        """On the first file that needs them: a rerun whose files all have records loads none."""
        s = self.s
        self.sscd = ModelSlot(SSCDModelHandler(s.sscd_location, s.sscd_preprocess, s.device, s.sscd_sha256))
        self.sscd.load()
        self.filters = []
        for f in s.filters:
            slot = ModelSlot(f.handler())
            slot.load()
            self.filters.append((f, slot))

    def process(self, element):
        file_index, f = element
        with Timer(self.progress):
            kept_path = join(self.records, f"{f.identity()}.parquet") if self.records else None
            if kept_path and FileSystems.exists(kept_path):
                items = items_from_parquet(read_file(kept_path), file_index)
                self.progress.add("reused", len(items))
                self.progress.add("files")
            else:
                items = self._fresh(file_index, f, kept_path)
            yield from items

    def _fresh(self, file_index: int, f, kept_path: str | None) -> list[Item]:
        if self.sscd is None:
            self._load_models()
        items = list(self._process(file_index, f.path, f.root))
        if kept_path:
            write_file(kept_path, items_to_parquet(items))
        return items

    def _process(self, file_index: int, path: str, root: str):
        chunk: list[_Pending] = []
        ordinal = -1
        try:
            for ordinal, raw in enumerate(read_items(path, root, self.s.columns, self.s.edit)):
                id_ = item_id(file_index, ordinal)
                self.progress.add("inputs")
                if raw.reason is not None:
                    self.progress.add("rejected")
                    yield Item(id_, raw.key, raw.source, raw.reason, caption=raw.caption)
                    continue
                try:
                    kw = dict(resolution=self.s.resolution, min_size=self.s.min_size, max_aspect=self.s.max_aspect,
                              max_pixels=self.s.max_pixels, buckets=list(self.s.buckets) if self.s.buckets else None,
                              sscd=self.s.sscd_preprocess)
                    valid = (validate_pair(raw.source_image, raw.image, **kw) if self.s.edit
                             else validate(raw.image, **kw))
                except ImageRejected as e:
                    self.progress.add("rejected")
                    yield Item(id_, raw.key, raw.source, e.reason, caption=raw.caption)
                    continue
                except Exception as e:  # noqa: BLE001  (one bad item must not stop the file)
                    log.warning("%s: validation failed unexpectedly: %r", raw.source, e)
                    self.progress.add("rejected")
                    yield Item(id_, raw.key, raw.source, f"{FAILED_PREFIX}validate", caption=raw.caption)
                    continue
                chunk.append(_Pending(id_, raw, valid))
                if len(chunk) >= self.s.chunk:
                    yield from self._finish(chunk)
                    chunk = []
        except Exception as e:  # noqa: BLE001  (the reader itself failed: say where, keep what was read)
            log.warning("%s: reading stopped after %d items: %r", path, ordinal + 1, e)
            stem = sanitize_key(posixpath.basename(path).rpartition(".")[0] or posixpath.basename(path))
            yield Item(item_id(file_index, ordinal + 1), f"{stem}#unreadable", f"{path}@item{ordinal + 1}",
                       UNREADABLE_ARCHIVE_TAIL)
        if chunk:
            yield from self._finish(chunk)
        self.progress.add("files")

    def _finish(self, chunk: list[_Pending]):
        """Filters in order, then SSCD on what passed; one Item per pending input."""
        alive = chunk
        for f, slot in self.filters:
            try:
                scores = slot.run([(p.valid.image, p.caption) if f.kind == CLIP_SCORE else p.valid.image
                                   for p in alive])
            except Exception as e:  # noqa: BLE001  (a failed chunk: its items get dead-letter rows)
                log.warning("filter %s failed on a chunk of %d: %r", f.name, len(alive), e)
                for p in alive:
                    yield p.item(f"{FAILED_PREFIX}filter:{f.name}")
                self.progress.add("rejected", len(alive))
                return
            passed = []
            for p, score in zip(alive, scores):
                p.scores.append((f.name, score))
                if score is not None and score == score:  # NaN never passes and is not recorded
                    self.score_metrics[f.name].update(int(round(score * 1000)))
                if f.rejects(score):
                    self.progress.add("rejected")
                    yield p.item(f"{FILTERED_PREFIX}{f.name}")
                else:
                    passed.append(p)
            alive = passed
        if not alive:
            return
        try:
            emb = self.sscd.run([p.valid.sscd for p in alive])
        except Exception as e:  # noqa: BLE001
            log.warning("SSCD failed on a chunk of %d: %r", len(alive), e)
            for p in alive:
                yield p.item(f"{FAILED_PREFIX}sscd")
            self.progress.add("rejected", len(alive))
            return
        for p, vec in zip(alive, emb):
            yield p.item(embedding=vec.astype("float32").tobytes())
        self.progress.add("valid", len(alive))
        self.progress.add("embedded", len(alive))
