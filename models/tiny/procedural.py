"""Procedural images with truthful captions: coloured shapes on flat-shaded textures.

The tiny autoencoder and the tiny SSCD model are fitted on these, and `flowcurate sample-data` writes
them as raw shards, so pictures later in the demo mean something and captions say what is drawn
("a red circle above a blue square on a striped gray background").

Everything is a pure function of a `numpy.random.Generator`: the same seed gives the same pixels.
Scenes are described in unit coordinates and rendered at any size (2x supersampled, then reduced),
so one scene can be drawn at 64x64 for the AE and at 200x150 for sample data.

`copy_variant` makes the near-duplicates SSCD is meant to catch (re-encode, resize, slight crop,
colour jitter), used both to train the tiny SSCD model and to plant duplicates in sample data.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (245, 130, 190),
    "cyan": (40, 200, 220),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring")
BACKGROUNDS = ("plain", "gradient", "striped", "checkered")
COPY_KINDS = ("exact", "reencode", "resize", "crop", "jitter")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float  # centre, unit coordinates (0..1 across the width / height)
    cy: float
    r: float  # radius as a fraction of the shorter side
    angle: float  # rotation in degrees (ignored for circles and rings)


@dataclass(frozen=True)
class Scene:
    background: str
    bg_colors: tuple[str, str]
    bg_param: float  # stripe / checker period or gradient angle, in [0, 1)
    shapes: tuple[Shape, ...]


def random_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    names = list(COLORS)
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    c1, c2 = rng.choice(len(names), size=2, replace=False)
    n = int(rng.integers(1, max_shapes + 1))
    shapes: list[Shape] = []
    bg_names = {names[c1], names[c2]} if bg != "plain" else {names[c1]}
    for _ in range(n):
        for _attempt in range(20):  # keep shapes apart so relations are unambiguous
            r = float(rng.uniform(0.12, 0.24 if n > 1 else 0.34))
            cx, cy = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
            if all(math.hypot(cx - s.cx, cy - s.cy) > r + s.r + 0.02 for s in shapes):
                break
        color = names[rng.choice([i for i, c in enumerate(names) if c not in bg_names])]
        shapes.append(Shape(SHAPES[rng.integers(len(SHAPES))], color, cx, cy, r, float(rng.uniform(0, 360))))
    return Scene(bg, (names[c1], names[c2]), float(rng.uniform()), tuple(shapes))


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "to the left of" if dx > 0 else "to the right of"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _bg_phrase(scene: Scene) -> str:
    c1, c2 = scene.bg_colors
    return {
        "plain": f"a plain {c1} background",
        "gradient": f"{_article(c1)} {c1} to {c2} gradient background",
        "striped": f"{_article(c1)} {c1} and {c2} striped background",
        "checkered": f"{_article(c1)} {c1} and {c2} checkered background",
    }[scene.background]


def caption(scene: Scene) -> str:
    """A truthful caption: what is drawn, where, on what."""
    things = [f"{_article(s.color)} {s.color} {s.kind}" for s in scene.shapes]
    if len(things) == 2:
        subject = f"{things[0]} {_relation(scene.shapes[0], scene.shapes[1])} {things[1]}"
    elif len(things) > 2:
        subject = ", ".join(things[:-1]) + f" and {things[-1]}"
    else:
        subject = things[0]
    return f"{subject} on {_bg_phrase(scene)}"


def _draw_background(scene: Scene, w: int, h: int) -> Image.Image:
    c1 = np.array(COLORS[scene.bg_colors[0]], np.float32)
    c2 = np.array(COLORS[scene.bg_colors[1]], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = float(min(w, h))
    if scene.background == "plain":
        arr = np.broadcast_to(c1, (h, w, 3))
    elif scene.background == "gradient":
        a = scene.bg_param * 2 * math.pi
        proj = (xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        arr = c1 * (1 - t[..., None]) + c2 * t[..., None]
    else:
        period = s * (0.12 + 0.18 * scene.bg_param)  # wide bands: flat-shaded, AE-friendly
        if scene.background == "striped":
            m = (np.floor((xx + yy) / period) % 2)[..., None]
        else:
            m = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
        arr = c1 * (1 - m) + c2 * m
    return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8), "RGB")


def _polygon(shape: Shape, w: int, h: int) -> list[tuple[float, float]]:
    s = min(w, h)
    cx, cy, r = shape.cx * w, shape.cy * h, shape.r * s
    if shape.kind == "square":
        angles, radii = [45 + 90 * i for i in range(4)], [r] * 4
    elif shape.kind == "diamond":
        angles, radii = [0, 90, 180, 270], [r * 0.75, r, r * 0.75, r]
    elif shape.kind == "triangle":
        angles, radii = [-90 + 120 * i for i in range(3)], [r] * 3
    else:  # star
        angles, radii = [-90 + 36 * i for i in range(10)], [r if i % 2 == 0 else r * 0.45 for i in range(10)]
    rot = shape.angle if shape.kind != "diamond" else 0.0
    if shape.kind == "triangle":
        rot = shape.angle % 30 - 15  # stay recognisably pointing up
    return [(cx + rr * math.cos(math.radians(a + rot)), cy + rr * math.sin(math.radians(a + rot)))
            for a, rr in zip(angles, radii)]


def render(scene: Scene, width: int, height: int | None = None) -> Image.Image:
    """Draw `scene` as an RGB image of `width` x `height` (2x supersampled for smooth edges)."""
    height = height or width
    w, h = 2 * width, 2 * height
    img = _draw_background(scene, w, h)
    draw = ImageDraw.Draw(img)
    s = min(w, h)
    for shape in scene.shapes:
        color = COLORS[shape.color]
        cx, cy, r = shape.cx * w, shape.cy * h, shape.r * s
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif shape.kind == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r * 0.35)))
        else:
            draw.polygon(_polygon(shape, w, h), fill=color)
    return img.resize((width, height), Image.Resampling.LANCZOS)


def random_image(rng: np.random.Generator, width: int, height: int | None = None) -> tuple[Image.Image, str]:
    """One random scene rendered, with its caption."""
    scene = random_scene(rng)
    return render(scene, width, height), caption(scene)


def image_batch(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`n` random square images as uint8 `(n, size, size, 3)`."""
    return np.stack([np.asarray(random_image(rng, size)[0]) for _ in range(n)])


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def copy_variant(img: Image.Image, rng: np.random.Generator, kind: str | None = None) -> Image.Image:
    """A near-duplicate of `img`: `exact`, `reencode` (JPEG q 30-70), `resize` (0.5-0.9x), `crop`
    (keep 85-95 % of each side), `jitter` (brightness / contrast / saturation +-20 %); `None` picks one
    of the non-exact kinds at random (and sometimes adds a re-encode on top)."""
    if kind is None:
        kind = COPY_KINDS[1 + rng.integers(len(COPY_KINDS) - 1)]
    w, h = img.size
    if kind == "exact":
        out = img.copy()
    elif kind == "reencode":
        out = Image.open(io.BytesIO(jpeg_bytes(img, int(rng.integers(30, 71))))).convert("RGB")
    elif kind == "resize":
        f = float(rng.uniform(0.5, 0.9))
        out = img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BILINEAR)
    elif kind == "crop":
        fw, fh = rng.uniform(0.85, 0.95, size=2)
        cw, ch = round(w * fw), round(h * fh)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = img.crop((x0, y0, x0 + cw, y0 + ch))
    elif kind == "jitter":
        out = img
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            out = enhancer(out).enhance(float(rng.uniform(0.8, 1.2)))
    else:
        raise ValueError(f"unknown copy kind {kind!r}; known: {COPY_KINDS}")
    return out
