"""Odd-but-valid and hostile raw inputs for the pipeline tests, with what the pipeline must make of them.

    truth = write_odd_inputs(Path("raw_extra"))   # odd.tar, hostile.tar, cut.tar (truncated)

Odd but valid (kept, converted to RGB correctly): CMYK JPEG, 16-bit greyscale PNG (scaled, not
clipped), palette PNG with transparency, EXIF-rotated JPEG (width/height swap), PNG bytes named .jpg,
WebP. Hostile (contained as reasoned rows): a decompression bomb (a PNG header claiming 100k x 100k),
zero bytes, non-image bytes, `../` member names (sanitised keys; nothing written outside OUT), a key
repeated in one tar, and a tar cut in the middle of a member.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from flowcurate.models.tiny.procedural import random_scene, render


def _scene(seed: int, w: int = 96, h: int = 72) -> Image.Image:
    rng = np.random.default_rng(1000 + seed)
    return render(random_scene(rng), w, h).convert("RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def odd_images() -> dict[str, tuple[str, bytes, tuple[int, int], np.ndarray]]:
    """key -> (member extension, bytes, expected (width, height) after EXIF transpose, expected RGB
    pixels of the decoded original (for a colour check))."""
    out = {}
    img = _scene(1)
    cmyk = img.convert("CMYK")
    out["odd_cmyk"] = ("jpg", _encode(cmyk, "JPEG", quality=95), img.size, np.asarray(img))
    grey = np.asarray(_scene(2).convert("L"), np.uint16) * 257  # 16-bit: full range, 65535 = white
    g8 = (grey // 257).astype(np.uint8)
    out["odd_16bit"] = ("png", _encode(Image.fromarray(grey.astype(np.uint16)), "PNG"),
                        (grey.shape[1], grey.shape[0]), np.stack([g8] * 3, -1))
    pal = _scene(3).quantize(16)
    pal.info["transparency"] = 0
    rgba = pal.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out["odd_palette_alpha"] = ("png", _encode(pal, "PNG"), pal.size,
                                np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    rot = _scene(4, 96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 96x64 stored -> 64x96 shown
    out["odd_exif_rotated"] = ("jpg", _encode(rot, "JPEG", quality=95, subsampling=0, exif=exif.tobytes()), (64, 96),
                               np.asarray(rot.transpose(Image.Transpose.ROTATE_270)))
    png = _scene(5)
    out["odd_png_named_jpg"] = ("jpg", _encode(png, "PNG"), png.size, np.asarray(png))
    webp = _scene(6)
    out["odd_webp"] = ("webp", _encode(webp, "WEBP", lossless=True), webp.size, np.asarray(webp))
    return out


def write_odd_inputs(root: Path) -> dict:
    """Write root/odd.tar, root/hostile.tar and root/cut.tar -> truth: {"kept": {key: (w, h)},
    "rejected": {key: reason}, "pixels": {key: expected RGB}, "escape": the `../` target name}."""
    root.mkdir(parents=True, exist_ok=True)
    odd = odd_images()
    with tarfile.open(root / "odd.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, (ext, data, _, _) in odd.items():
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", f"an odd image {key}".encode())
    kept = {k: size for k, (_, _, size, _) in odd.items()}
    rejected = {}
    with tarfile.open(root / "hostile.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "hostile_bomb.png", _bomb_png())
        rejected["hostile_bomb"] = "too_many_pixels"
        _add(tar, "hostile_zero.jpg", b"")
        rejected["hostile_zero"] = "empty_file"
        _add(tar, "hostile_text.jpg", b"this is not an image at all\n" * 20)
        rejected["hostile_text"] = "undecodable"
        # a member name that would escape the output folder if used as a path
        _add(tar, "../../escaped_evil.jpg", _encode(_scene(7), "JPEG", quality=90))
        kept["escaped_evil"] = (96, 72)
        # the same key twice: the first (by source) keeps the key, the second becomes hostile_twice~2
        _add(tar, "hostile_twice.jpg", _encode(_scene(8), "JPEG", quality=90))
        _add(tar, "hostile_sep.txt", b"separator")
        _add(tar, "hostile_twice.jpg", _encode(_scene(9), "JPEG", quality=90))
        kept["hostile_twice"] = (96, 72)
        rejected["hostile_twice~2"] = "duplicate_key"
        rejected["hostile_sep"] = "missing_image"
    # a tar cut inside its third member: the first two samples are readable
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(3):
            _add(tar, f"cut_{i}.png", _encode(_scene(20 + i), "PNG"))
    data = buf.getvalue()
    third = data.index(b"cut_2.png")
    (root / "cut.tar").write_bytes(data[: third + 512 + 700])
    kept.update({"cut_0": (96, 72), "cut_1": (96, 72)})
    rejected["cut#truncated"] = "unreadable_archive_tail"
    return {"kept": kept, "rejected": rejected, "pixels": {k: px for k, (_, _, _, px) in odd.items()},
            "escape": "escaped_evil.jpg"}


def read_manifest(out: Path) -> dict[str, dict]:
    """A pipeline run's manifest (OUT/manifest Parquet), by key; asserts no key repeats."""
    rows = pq.read_table(out / "manifest").to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "manifest keys repeat"
    return by_key


def read_shards(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """A pipeline run's OUT/shards/*.tar: shard name -> key -> member name -> bytes."""
    shards = {}
    for path in sorted((out / "shards").glob("*.tar")):
        samples: dict = {}
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, _, name = m.name.partition(".")
                samples.setdefault(key, {})[name] = tf.extractfile(m).read()
        shards[path.name] = samples
    return shards


def assert_same_shards(a: Path, b: Path) -> None:
    """Two runs' shards hold the same samples, member for member: arrays within float16 rounding
    (another process or thread count may reduce in another order), everything else byte-identical."""
    from flowcurate.formats.shards import load_npy

    ta, tb = read_shards(a), read_shards(b)
    assert ta.keys() == tb.keys() and ta
    for shard in ta:
        assert ta[shard].keys() == tb[shard].keys()
        for key in ta[shard]:
            for name, data in ta[shard][key].items():
                if name.endswith(".npy"):
                    np.testing.assert_allclose(load_npy(data).astype(np.float32),
                                               load_npy(tb[shard][key][name]).astype(np.float32),
                                               atol=1e-3, rtol=1e-3)
                else:
                    assert data == tb[shard][key][name]


def write_red_labels(folder: Path, n: int, seed: int) -> Path:
    """`n` procedural PNGs (no red background) labelled 1 when a red shape is drawn, and their
    `labels.csv` (`path,label`, with a header): `flowcurate filters fit`'s input."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["path,label"]
    while len(rows) <= n:
        scene = random_scene(rng)
        if "red" in scene.bg_colors:  # the property is a red *shape*; keep it unambiguous
            continue
        name = f"{len(rows) - 1:04d}.png"
        render(scene, 64, 64).convert("RGB").save(folder / name)
        rows.append(f"{name},{int(any(s.color == 'red' for s in scene.shapes))}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"
