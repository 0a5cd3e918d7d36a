"""The manifest and embeddings contracts and the rejection vocabulary, each defined once.

Manifest (`OUT/manifest/`, Parquet): exactly one row per input, `status` kept | duplicate | rejected,
`reason` from the vocabulary below on rejected rows, `duplicate_of` naming a kept key on duplicate
rows, and one `score_<name>` column per configured filter (`manifest_schema`). Embeddings (`OUT/embeddings/`, and `flowcurate dedup`'s `embeddings.parquet`): L2-normalised
SSCD descriptors by key; also a valid `flowcurate dedup --input`. docs/architecture.md explains each
column.
"""

from __future__ import annotations

import pyarrow as pa

KEPT, DUPLICATE, REJECTED = "kept", "duplicate", "rejected"
STATUSES = (KEPT, DUPLICATE, REJECTED)

# Rejection reasons; extend here, in one place (and in docs/architecture.md).
EMPTY_FILE = "empty_file"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_SMALL = "too_small"
BAD_ASPECT = "bad_aspect"
MISSING_IMAGE = "missing_image"
DUPLICATE_KEY = "duplicate_key"
UNREADABLE_ARCHIVE_TAIL = "unreadable_archive_tail"
BAD_EMBEDDING = "bad_embedding"
# edit triplets (`[pipeline] task = "edit"`): no instruction text; the source and edited images have
# different sizes (one crop box cannot align them); the edit changes no pixel
MISSING_INSTRUCTION = "missing_instruction"
EDIT_SIZE_MISMATCH = "edit_size_mismatch"
EDIT_UNCHANGED = "edit_unchanged"
REASONS = (EMPTY_FILE, UNDECODABLE, TRUNCATED, TOO_MANY_PIXELS, TOO_SMALL, BAD_ASPECT, MISSING_IMAGE,
           DUPLICATE_KEY, UNREADABLE_ARCHIVE_TAIL, BAD_EMBEDDING, MISSING_INSTRUCTION, EDIT_SIZE_MISMATCH,
           EDIT_UNCHANGED)
FILTERED_PREFIX = "filtered:"  # + the configured filter's name, e.g. "filtered:reference"
# + the pipeline stage, e.g. "failed:validate": an unexpected error on this one element (a dead letter),
# kept as a row so nothing is lost silently; the run goes on
FAILED_PREFIX = "failed:"


def is_reason(reason: str) -> bool:
    return reason in REASONS or any(reason.startswith(p) and len(reason) > len(p)
                                    for p in (FILTERED_PREFIX, FAILED_PREFIX))


MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("duplicate_of", pa.string()),
    ("similarity", pa.float32()),
    ("cluster", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("caption_original", pa.string()),
    ("caption_synthetic", pa.string()),
    ("notes", pa.list_(pa.string())),
    ("shard", pa.string()),
    ("previous", pa.string()),  # --previous runs: the earlier output holding duplicate_of (or the key)
    ("url", pa.string()),  # kept rows: the source's url (img2dataset's url column or json member), if any
])

# Filter scores: one float64 column per configured filter, `score_<name>`, on every row the filter
# scored (kept rows too); null where it did not run (an input rejected before it, or a clip_score
# without a caption). A clip_score filter also records the synthetic caption's score, `score_<name>_syn`.
SCORE_PREFIX = "score_"
SYN_SUFFIX = "_syn"


def score_column(name: str, synthetic: bool = False) -> str:
    return f"{SCORE_PREFIX}{name}{SYN_SUFFIX if synthetic else ''}"


def manifest_schema(score_columns=()) -> pa.Schema:
    """The manifest of a run whose filters write `score_columns` (none: `MANIFEST_SCHEMA` itself)."""
    schema = MANIFEST_SCHEMA
    for c in score_columns:
        schema = schema.append(pa.field(c, pa.float64()))
    return schema


EMBEDDINGS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("embedding", pa.list_(pa.float32())),
    ("width", pa.int32()),
    ("height", pa.int32()),
])
