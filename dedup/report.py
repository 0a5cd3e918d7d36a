"""What `flowcurate dedup` writes: `dedup.parquet`, `summary.json` and `duplicates.png`.

    dedup.parquet   one row per input, sorted by key (DEDUP_SCHEMA below)
    summary.json    counts, timings, parameters, resolved config, SSCD preprocessing, and the
                    removed-count table over SD3 Fig. 16b's thresholds from one search
    duplicates.png  a contact sheet for judging the threshold by eye: the largest groups (kept image
                    first, then its duplicates with their cosines), the borderline pairs (cosines
                    nearest the threshold) and items filtered against `--reference`

Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from flowcurate.formats.files import write_atomic

DEDUP_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),  # "path", "tar#member" or "embeddings-file#key": enough to find the input again
    ("status", pa.string()),  # kept | duplicate | rejected
    ("reason", pa.string()),  # rejected rows: flowcurate.formats.manifest's vocabulary (filtered:reference for --reference)
    ("duplicate_of", pa.string()),  # duplicate rows: the kept key that removed it
    ("similarity", pa.float32()),  # cosine to duplicate_of, or to reference_key; rounded to 1e-3
    ("reference_key", pa.string()),  # filtered:reference rows: the most similar reference item
    ("cluster", pa.int32()),  # top-1 k-means cluster; null for rejected rows
    ("width", pa.int32()),  # after EXIF transpose; null when unknown
    ("height", pa.int32()),
])
SIMILARITY_DECIMALS = 3  # cosines are reported to 1e-3 (full float32 stays in DedupResult)


@dataclass
class Row:
    key: str
    source: str | None
    status: str
    reason: str | None = None
    duplicate_of: str | None = None
    similarity: float | None = None
    reference_key: str | None = None
    cluster: int | None = None
    width: int | None = None
    height: int | None = None


def report_similarity(cos: float) -> float:
    return round(float(cos), SIMILARITY_DECIMALS)


def write_rows(path: Path, rows: Iterable[Row]) -> pa.Table:
    """Rows -> `path` (Parquet, DEDUP_SCHEMA), sorted by key. Returns the table."""
    rows = sorted(rows, key=lambda r: r.key)
    cols = {name: [getattr(r, name) for r in rows] for name in DEDUP_SCHEMA.names}
    table = pa.Table.from_pydict(cols, schema=DEDUP_SCHEMA)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    return table


def write_summary(path: Path, summary: dict) -> None:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (Path, os.PathLike)):
            return str(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    text = json.dumps(summary, indent=2, default=default, allow_nan=False) + "\n"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def groups_of(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """kept key -> its duplicate rows, most similar first (ties by key)."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.status == "duplicate":
            groups.setdefault(r.duplicate_of, []).append(r)
    for members in groups.values():
        members.sort(key=lambda r: (-r.similarity, r.key))
    return groups


def group_summary(rows: Sequence[Row]) -> dict:
    """Number of groups (a kept item with at least one duplicate), the largest, sizes histogram."""
    sizes = [1 + len(m) for m in groups_of(rows).values()]
    hist: dict[str, int] = {}
    for s in sorted(sizes):
        hist[str(s)] = hist.get(str(s), 0) + 1
    return {"count": len(sizes), "largest": max(sizes, default=0), "size_histogram": hist}


# ----------------------------------------------------------------------------- contact sheet

CELL = 136  # thumbnail cell (pixels), the image fitted into THUMB x THUMB
THUMB = 124
LABEL_H = 30
COLUMNS = 8
TITLE_H = 26
MAX_GROUPS = 6
MAX_BORDERLINE = 8  # pairs (two cells each)
MAX_REFERENCE = 8


def sheet_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(img: Image.Image | None, side: int) -> Image.Image:
    if img is None:  # unreadable now: a grey placeholder with a cross
        ph = Image.new("RGB", (side, side), (200, 200, 200))
        d = ImageDraw.Draw(ph)
        d.line((0, 0, side, side), fill=(150, 150, 150), width=2)
        d.line((0, side, side, 0), fill=(150, 150, 150), width=2)
        return ph
    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    return img


def _short(text: str, n: int = 20) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def contact_sheet(
    path: Path,
    rows: Sequence[Row],
    read_image: Callable[[str], Image.Image | None],
    threshold: float,
) -> dict:
    """Write `duplicates.png` from the decision rows; images come from `read_image(key)` (None when
    it cannot be read now). -> what was shown: {"groups": n, "borderline_pairs": n, "reference": n}."""
    groups = groups_of(rows)
    largest = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:MAX_GROUPS]
    dups = sorted((r for r in rows if r.status == "duplicate"), key=lambda r: (r.similarity, r.key))
    borderline = dups[:MAX_BORDERLINE]
    refs = sorted((r for r in rows if r.reference_key is not None),
                  key=lambda r: (r.similarity, r.key))[:MAX_REFERENCE]

    # sections: (title, [cells]); a cell is (key, label line 1, label line 2, highlight)
    sections: list[tuple[str, list[list[tuple[str, str, str, bool]]]]] = []
    if largest:
        lines = []
        for kept, members in largest:
            cells = [(kept, _short(kept), "kept", True)]
            cells += [(m.key, _short(m.key), f"{m.similarity:.3f}", False) for m in members[:COLUMNS - 1]]
            if len(members) > COLUMNS - 1:
                cells[-1] = (cells[-1][0], cells[-1][1], f"{cells[-1][2]} (+{len(members) - COLUMNS + 2})", False)
            lines.append(cells)
        sections.append((f"Largest groups (kept first, then duplicates with cosine; threshold {threshold:g})",
                         lines))
    if borderline:
        cells = []
        for r in borderline:
            cells += [(r.duplicate_of, _short(r.duplicate_of), "kept", True),
                      (r.key, _short(r.key), f"{r.similarity:.3f}", False)]
        lines = [cells[i:i + COLUMNS] for i in range(0, len(cells), COLUMNS)]
        sections.append(("Borderline pairs (lowest cosines above the threshold: are these copies?)", lines))
    if refs:
        cells = [(r.key, _short(r.key), f"{r.similarity:.3f} ref {_short(r.reference_key, 8)}", False)
                 for r in refs]
        sections.append(("Filtered against --reference (input image; cosine and most similar reference key)",
                         [cells[i:i + COLUMNS] for i in range(0, len(cells), COLUMNS)]))

    width = COLUMNS * CELL
    if not sections:
        sheet = Image.new("RGB", (width, 60), "white")
        ImageDraw.Draw(sheet).text((10, 20), f"No duplicates at cosine > {threshold:g}.", fill="black",
                                   font=sheet_font(16))
        sheet.save(path, format="PNG")
        return {"groups": 0, "borderline_pairs": 0, "reference": 0}
    height = sum(TITLE_H + len(lines) * (CELL + LABEL_H) for _, lines in sections) + 8
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    title_font, label_font = sheet_font(15), sheet_font(11)
    cache: dict[str, Image.Image] = {}
    y = 4
    for title, lines in sections:
        draw.text((6, y + 4), title, fill="black", font=title_font)
        y += TITLE_H
        for cells in lines:
            for c, (key, line1, line2, kept) in enumerate(cells):
                if key not in cache:
                    cache[key] = _fit(read_image(key), THUMB)
                thumb = cache[key]
                x0 = c * CELL
                if kept:
                    draw.rectangle((x0 + 1, y + 1, x0 + CELL - 2, y + CELL - 2), outline=(40, 160, 40), width=3)
                sheet.paste(thumb, (x0 + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
                draw.text((x0 + 4, y + CELL), line1, fill="black", font=label_font)
                draw.text((x0 + 4, y + CELL + 14), line2, fill=(0, 100, 0) if kept else (160, 0, 0),
                          font=label_font)
            y += CELL + LABEL_H
    write_atomic(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return {"groups": len(largest), "borderline_pairs": len(borderline), "reference": len(refs)}


def removed_table(counts: dict[float, int], thresholds: Iterable[float]) -> dict[str, int | None]:
    """{"0.5": n, ...}: removed counts per threshold; None for thresholds below the searched one
    (pairs were searched only above it)."""
    return {f"{t:g}": (None if t not in counts else int(counts[t])) for t in thresholds}
