"""`flowcurate run`: raw image shards -> curated training shards, one Beam graph for every runner.

    input files -> pass 1 (per file: read, validate, filters, pixel hash, SSCD) -> small records
                -> decide (repeated keys, exact and near duplicates, keep rule) -> kept records
                -> pass 2 (per file with kept items: re-read, caption, encode, write shard parts)

Shuffles carry keys, ids, sizes, hashes and descriptors, never pixels, so memory and shuffle volume do
not grow with the images' resolution. Every input ends as exactly one manifest row (kept, duplicate or
rejected with a reason). Model batches are chunks formed inside one file, so reruns give
byte-identical shards and the worker count changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from flowcurate.captioning.handler import CaptionModelHandler
from flowcurate.formats.config import to_dict
from flowcurate.formats.devices import TOKEN_ENV
from flowcurate.formats.manifest import EMBEDDINGS_SCHEMA, FAILED_PREFIX, manifest_schema
from flowcurate.formats.shards import RECORD_JSON
from flowcurate.formats.tars import sanitize_key
from flowcurate.models.sscd import SSCDPreprocess, file_sha256
from flowcurate.pipeline.decide import Decide
from flowcurate.pipeline.filters import CLIP_SCORE, check_filters, score_columns
from flowcurate.pipeline.handlers import EncodeModelHandler, SSCDModelHandler
from flowcurate.pipeline.options import Launch, OptionsError, launch_options
from flowcurate.pipeline.pass1 import Pass1, Pass1Settings
from flowcurate.pipeline.pass2 import CROPS, PARTS, Pass2, Pass2Settings
from flowcurate.pipeline.previous import ReadPrevious, check_compatible, shard_base
from flowcurate.pipeline.progress import NAMESPACE as PROGRESS_NAMESPACE
from flowcurate.pipeline.progress import Progress
from flowcurate.pipeline.read import EditNames, ListInputs
from flowcurate.pipeline.records import ORDINAL_BITS, Item, file_index_of, item_id, with_score_columns
from flowcurate.pipeline.shuffles import shuffle_bytes
from flowcurate.pipeline.validate import aspect_buckets
from flowcurate.pipeline.write import (
    CROP_EMBEDDINGS,
    PASS1_DIR,
    PASS2_DIR,
    RUN_JSON,
    STATS_JSON,
    count_row,
    delete_tree,
    embedding_record,
    join,
    make_conditioning,
    read_file,
    shard_offsets,
    write_index,
    write_json,
    write_shard,
    write_stats,
)

AsSingleton = beam.pvalue.AsSingleton
def _file_failed(dead) -> Item:
    """Pass 1 raised on a whole file (a bug, not bad input): one rejected row says which file."""
    (file_index, f), _error = dead[0], dead[1]
    stem = sanitize_key(posixpath.basename(f.path))
    return Item(item_id(file_index, (1 << ORDINAL_BITS) - 1), f"{stem}#failed", f.path, f"{FAILED_PREFIX}pass1")


def pass1_settings(launch: Launch) -> Pass1Settings:
    cfg, o = launch.config, launch.ours
    pc, dd, m = cfg.pipeline, cfg.dedup, cfg.models
    return Pass1Settings(
        resolution=pc.resolution, min_size=pc.min_size, max_aspect=pc.max_aspect, max_pixels=pc.max_pixels,
        buckets=tuple(aspect_buckets(pc.resolution, pc.max_aspect)) if pc.aspect_buckets else None,
        sscd_location=m.sscd, sscd_preprocess=SSCDPreprocess(dd.sscd_size, tuple(dd.mean), tuple(dd.std)),
        chunk=pc.batch_size, device=pc.device, sscd_sha256=m.sscd_sha256,
        filters=tuple(check_filters([{"device": pc.device, **f} for f in pc.filters])),
        columns=(o.key_column, o.image_column, o.caption_column),
        edit=EditNames(pc.edit_source, pc.edit_target, pc.edit_instruction) if pc.task == "edit" else None)


def settings_hash(settings: Pass1Settings) -> str:
    """What pass 1's records are a function of (besides the file): every setting, and the content of
    the SSCD model and filter heads when they are local files (a path alone could name new weights)."""
    parts = [repr(settings)]
    for location in (settings.sscd_location, *(f.head for f in settings.filters)):
        path = Path(location).expanduser()
        parts.append(file_sha256(path) if path.is_file() else location)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build(p: beam.Pipeline, launch: Launch) -> dict[str, Any]:
    """Add the whole curation graph to `p`; returns the main PCollections (for tests)."""
    cfg, o = launch.config, launch.ours
    pc, dd, m = cfg.pipeline, cfg.dedup, cfg.models
    out = o.output.rstrip("/")

    def hinted(transform):  # a GPU hint on a whole pass: never splits what the pass fuses
        return transform.with_resource_hints(accelerator=o.model_accelerator) if o.model_accelerator else transform

    settings1 = pass1_settings(launch)
    pre, columns = settings1.sscd_preprocess, settings1.columns
    validation = {k: getattr(settings1, k) for k in ("resolution", "min_size", "max_aspect", "max_pixels", "buckets")}

    files = p | "ListInputs" >> ListInputs(o.input)
    indexed = (files
               | "Enumerate" >> beam.FlatMap(lambda fs: list(enumerate(fs)))
               | "Spread" >> beam.Reshuffle())
    records = join(out, PASS1_DIR, settings_hash(settings1))
    pass1 = (indexed | "Pass1" >> hinted(beam.ParDo(Pass1(settings1, records)).with_exception_handling()))
    items = ((pass1.good, pass1.bad | "FileFailed" >> beam.Map(_file_failed)) | "Items" >> beam.Flatten())

    previous = p | "ReadPrevious" >> ReadPrevious(o.previous) if o.previous else None
    decided = items | "Decide" >> Decide(dd, pc.val_fraction, reference=tuple(o.reference or ()), previous=previous)
    kept = decided["kept"]
    offsets = (kept
               | "FileSplit" >> beam.Map(lambda k: ((file_index_of(k.id), k.split), 1))
               | "KeptPerFile" >> beam.CombinePerKey(sum)
               | "KeptCounts" >> beam.combiners.ToList()
               | "Offsets" >> beam.Map(shard_offsets, pc.shard_size))
    sd3 = "sd3" in pc.outputs  # else no AE or text encoder loads and there is no conditioning record
    conditioning = (p | "RecordSeed" >> beam.Create([None])
                    | "Conditioning" >> beam.Map(make_conditioning, cfg, launch.sd3_label, out))

    captioner = CaptionModelHandler(
        m.captioner, revision=m.captioner_revision, prompt=pc.caption_prompt,
        max_new_tokens=pc.caption_max_new_tokens, batch_size=pc.caption_batch_size,
        trust_remote_code=m.trust_remote_code, device=pc.device,
        share_model=pc.share_models) if m.captioner and not settings1.edit else None  # an instruction is the text
    encoder = EncodeModelHandler(m.sd3, revision=m.sd3_revision, t5_length=pc.t5_max_length, ae_dtype=pc.ae_dtype,
                                 te_dtype=pc.text_encoder_dtype, device=pc.device,
                                 share_model=pc.share_models) if sd3 else None
    images = (pc.image_format, pc.jpeg_quality, pc.keep_original) if "images" in pc.outputs else None
    settings2 = Pass2Settings(out=out, **validation, chunk=pc.batch_size, shard_size=pc.shard_size,
                              store_dtype=pc.store_dtype, captioner=captioner, encoder=encoder,
                              sscd=SSCDModelHandler(m.sscd, pre, pc.device, m.sscd_sha256), columns=columns,
                              first_shard=tuple(shard_base(o.previous).items()) if o.previous else (),
                              images=images, clip_scores=tuple(f for f in settings1.filters if f.kind == CLIP_SCORE)
                              if captioner is not None else (), edit=settings1.edit)
    written = (kept
               | "ByFile" >> beam.Map(lambda k: (file_index_of(k.id), k))
               | "GroupByFile" >> beam.GroupByKey()
               | "Pass2" >> hinted(beam.ParDo(Pass2(settings2), AsSingleton(files), AsSingleton(offsets),
                                              AsSingleton(conditioning))
                                   .with_output_types(Any).with_outputs(PARTS, CROPS, main="rows")))
    shards = (written[PARTS] | "PartsByShard" >> beam.GroupByKey()
              | "WriteShards" >> beam.Map(write_shard, out))
    index = (shards | "ShardCounts" >> beam.combiners.ToList()
             | "WriteIndex" >> beam.Map(write_index, out, AsSingleton(conditioning), tuple(pc.outputs), pc.task))

    rows = ((decided["rows"], written.rows) | "AllRows" >> beam.Flatten() | "Count" >> beam.Map(count_row))
    scores = score_columns(settings1.filters)  # one column per filter (kept rows too), when there are filters
    if scores:
        rows = rows | "ScoreColumns" >> beam.Map(with_score_columns, scores)
    rows | "WriteManifest" >> beam.io.WriteToParquet(
        join(out, "manifest", "part"), manifest_schema(scores), file_name_suffix=".parquet")
    (decided["embedded"] | "EmbeddingRecords" >> beam.Map(embedding_record)
     | "WriteEmbeddings" >> beam.io.WriteToParquet(join(out, "embeddings", "part"), EMBEDDINGS_SCHEMA,
                                                    file_name_suffix=".parquet"))

    written[CROPS] | "WriteCropEmbeddings" >> beam.io.WriteToParquet(
        join(out, CROP_EMBEDDINGS, "part"), EMBEDDINGS_SCHEMA, file_name_suffix=".parquet")

    info = {"config": to_dict(cfg), "inputs_spec": list(o.input), "runner": launch.runner,
            "sscd": {"location": m.sscd, "preprocess": pre.record()},
            "captioner": {"location": m.captioner, "revision": m.captioner_revision, "prompt": pc.caption_prompt,
                          "max_new_tokens": pc.caption_max_new_tokens, "greedy": True} if captioner else None}
    stats = (rows | "StatusReason" >> beam.Map(lambda r: (r["status"], r["reason"] or ""))
             | "CountStatus" >> beam.combiners.Count.PerElement()
             | "StatusList" >> beam.combiners.ToList()
             | "WriteStats" >> beam.Map(write_stats, out, info))
    return {"rows": rows, "stats": stats, "index": index, "conditioning": conditioning, "items": items}


def run_doc(launch: Launch, pass1_hash: str) -> dict:
    """What makes two launches the same run: the config, the inputs and how they are read, pass 1's
    settings hash. Kept as OUT/run.json; the same command again resumes, another one is refused."""
    o = launch.ours
    return {"config": to_dict(launch.config), "inputs": sorted(o.input), "previous": list(o.previous or []),
            "reference": list(o.reference or []),
            "columns": [o.key_column, o.image_column, o.caption_column], "pass1": pass1_hash}


def prepare_output(out: str, overwrite: bool, doc: dict | None = None, resume: bool = False, log=print) -> str:
    """Get OUT ready; returns "new", "resumed" or "replaced".

    The same run again (OUT/run.json equals `doc`; after a kill, or a finished run repeated) resumes:
    its final outputs are cleared and rewritten, pass 1's records of finished files are reused. An
    OUT holding another run is refused unless `overwrite`, which clears it (keeping only pass-1
    records made with the same pass-1 settings). `resume` insists on resuming."""
    final = [join(out, d) for d in ("shards", "manifest", "embeddings", CROP_EMBEDDINGS, STATS_JSON, RECORD_JSON)]
    present = [d for d in final if FileSystems.exists(d)]
    run_json = join(out, RUN_JSON)
    before = json.loads(read_file(run_json)) if FileSystems.exists(run_json) else None
    same = doc is not None and before == json.loads(json.dumps(doc))
    if resume and not same:
        raise OptionsError(f"--resume: {out} holds no run with these settings to resume"
                           + (" (its run.json differs: another config, other inputs or other pass-1 settings)"
                              if before else ""))
    if not same and (present or before) and not overwrite:
        what = "another run (other settings; its run.json differs)" if before else f"a curated run ({', '.join(present)})"
        raise OptionsError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another --output")
    for d in present:
        delete_tree(d)
    if not same:  # another run's pass-2 parts are of no use
        delete_tree(join(out, PASS2_DIR))
    if not same and doc is not None:  # keep only the pass-1 records this run can use
        keep = join(out, PASS1_DIR, doc["pass1"])
        stale = [m.path for m in FileSystems.match([join(out, PASS1_DIR, "*", "*.parquet")])[0].metadata_list
                 if not m.path.startswith(keep + "/")]
        if stale:
            FileSystems.delete(stale)
    if doc is not None:
        write_json(run_json, doc)
    if same:
        done = FileSystems.match([join(out, PASS1_DIR, doc["pass1"], "*.parquet")])[0].metadata_list
        log(f"resuming the run in {out}: pass-1 records of {len(done)} input file(s) are reused")
        return "resumed"
    return "replaced" if present or before else "new"


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None, log=print) -> dict | None:
    """Parse argv (Beam flags pass through), resolve models, run the graph; returns stats.json's
    contents when OUT is readable from here (local runs), else None."""
    launch = launch_options(argv, log=lambda msg: log(msg, file=sys.stderr) if log is print else log(msg))
    out = launch.ours.output.rstrip("/")
    check_inputs(launch.ours.input)
    if launch.ours.previous:
        try:
            check_compatible(launch.ours.previous, {"preprocess": pass1_settings(launch).sscd_preprocess.record()})
            shard_base(launch.ours.previous)
        except (OSError, ValueError, KeyError) as e:
            raise OptionsError(f"--previous: {e}") from None
    state = prepare_output(out, launch.ours.overwrite, run_doc(launch, settings_hash(pass1_settings(launch))),
                           launch.ours.resume, log=lambda msg: print(msg, file=sys.stderr) if log is print else log(msg))
    Progress.reset()
    os.environ[TOKEN_ENV] = uuid.uuid4().hex  # this run's local workers count themselves for "auto" GPUs
    t0 = time.perf_counter()
    p = test_pipeline or beam.Pipeline(options=launch.beam)
    build(p, launch)
    result = p.run()
    result.wait_until_finish()
    try:
        stats = json.loads(read_file(join(out, STATS_JSON)))
    except Exception:  # a remote runner still writing, or OUT not readable from here
        return None
    stats["wall_s"] = round(time.perf_counter() - t0, 1)
    try:  # the in-process runner's sampled sizes; other runners show theirs in their own UI
        stats["shuffle_bytes"] = shuffle_bytes(p, result)
    except Exception:  # noqa: BLE001  (no monitoring infos on this runner)
        stats["shuffle_bytes"] = None
    stats["stages"] = stage_metrics(result)
    stats["output"] = state
    return stats


def check_inputs(specs: list[str]) -> None:
    """Every --input must match at least one input file (a tar, an image or a Parquet file)."""
    from flowcurate.pipeline.read import input_patterns, is_input

    for spec in specs:
        pattern, _ = input_patterns(spec)
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # noqa: BLE001  (a filesystem that cannot list it says why)
            raise OptionsError(f"--input {spec!r}: cannot list it ({e})") from None
        if not found:
            raise OptionsError(f"--input {spec!r} matches nothing")
        if not any(is_input(m.path) for m in found):
            raise OptionsError(f"--input {spec!r} matches {len(found)} file(s) but no inputs "
                               "(.tar, image files, .parquet)")


def stage_metrics(result) -> dict[str, dict[str, int]]:
    """{stage: {what: count, "busy_ms": ...}} from the runner's counters (namespace flowcurate)."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, dict[str, int]] = {}
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(PROGRESS_NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001  (a runner without metrics)
        return out
    for c in counters:
        stage, _, what = c.key.metric.name.partition("/")
        if what:
            out.setdefault(stage, {})[what] = int(c.committed if c.committed is not None else c.attempted)
    return out
