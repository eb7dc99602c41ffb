"""Synthetic zero-shot SBIR benchmark, shaped like Sketchy Extended.

Every class is a fixed combination of parts taken from a small shared vocabulary:

* ``shape``  - outline family of the body (circle, square, tri, hex, star, diamond),
* ``spokes`` - number of radial spokes ending in a knob (0, 2, 3, 4, 6),
* ``inner``  - marking inside the body (plain, dot, cross, bars, ring, hole),
* ``attach`` - attachment (bare, handle on top, legs below, wavy tail on the right).

A class name spells its parts, e.g. ``hex-3spokes-cross-legs``. Unseen (zero-shot) classes are new
combinations of the same parts, so a model that learned the parts on the seen classes can recognise
the unseen ones; the split is checked so that every part value of an unseen class also occurs in
some seen class.

The two domains differ the way real photos and sketches do:

* photos (``photo/<class>/<class>_NNNN.jpg``): filled, shaded and textured objects in random colours,
  random position, scale, rotation and aspect, on varied backgrounds (solid, gradient, noise,
  stripes) with clutter distractors (some built from the same part vocabulary), noise and JPEG;
* sketches (``sketch/<class>/<class>_NNNN.png``): sparse dark strokes on white, drawn independently
  of any photo (category level), with wobble, jitter, overshoot, broken or missing strokes and
  varying stroke width.

``difficulty`` (0..1, default 0.5) scales clutter, rotation, noise and stroke damage together.

Every image is rendered from its own random generator seeded by ``(seed, class, domain, index)``,
so a rerun (or a resumed run) gives byte-identical files and images can be generated in any order
by any number of worker processes. Files are written atomically (temporary name, then rename) and
existing files are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from zsbir_infer.fsio import atomic_write

GENERATOR = "zsbir.synth"
GENERATOR_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "tri", "hex", "star", "diamond")
SPOKES: tuple[int, ...] = (0, 2, 3, 4, 6)
INNERS: tuple[str, ...] = ("plain", "dot", "cross", "bars", "ring", "hole")
ATTACHES: tuple[str, ...] = ("bare", "handle", "legs", "tail")

PHOTO, SKETCH = "photo", "sketch"
_DOMAIN_ID = {SKETCH: 0, PHOTO: 1}  # the domain tags of CONTRACTS §4
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class ClassSpec:
    """One synthetic class: a combination of parts. ``name`` is ``shape-Nspokes-inner-attach``."""

    shape: str
    spokes: int
    inner: str
    attach: str

    @property
    def name(self) -> str:
        """Readable, stable class name, e.g. ``hex-3spokes-cross-legs``."""
        return f"{self.shape}-{self.spokes}spokes-{self.inner}-{self.attach}"

    @classmethod
    def from_name(cls, name: str) -> ClassSpec:
        """Parse a class name written by :attr:`name`; raises ``ValueError`` on anything else."""
        parts = name.split("-")
        if len(parts) != 4 or not parts[1].endswith("spokes") or not parts[1][:-6].isdigit():
            raise ValueError(f"not a synthetic class name: {name!r} (expected shape-Nspokes-inner-attach)")
        spec = cls(parts[0], int(parts[1][:-6]), parts[2], parts[3])
        if spec.shape not in SHAPES or spec.spokes not in SPOKES or spec.inner not in INNERS:
            raise ValueError(f"unknown part in synthetic class name {name!r}")
        if spec.attach not in ATTACHES:
            raise ValueError(f"unknown part in synthetic class name {name!r}")
        return spec

    def parts(self) -> tuple[str, str, str, str]:
        """The four part values as strings (used to check the split's coverage)."""
        return (f"shape={self.shape}", f"spokes={self.spokes}", f"inner={self.inner}", f"attach={self.attach}")


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a synthetic benchmark. All of them are recorded in ``meta.json``."""

    classes: int = 125
    unseen: int = 25
    photos_per_class: int = 40
    sketches_per_class: int = 20
    size: int = 128
    seed: int = 0
    difficulty: float = 0.5
    jpeg_quality: int = 90

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message when a parameter is out of range."""
        n_all = len(SHAPES) * len(SPOKES) * len(INNERS) * len(ATTACHES)
        if not 2 <= self.classes <= n_all:
            raise ValueError(f"classes must be between 2 and {n_all} (the number of part combinations)")
        if not 1 <= self.unseen < self.classes:
            raise ValueError(
                f"unseen must be between 1 and classes-1 (got unseen={self.unseen}, classes={self.classes})"
            )
        if self.photos_per_class < 1 or self.sketches_per_class < 1:
            raise ValueError("photos_per_class and sketches_per_class must be at least 1")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size must be between 32 and 1024 pixels (got {self.size})")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative (got {self.seed})")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be between 0 and 1 (got {self.difficulty})")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be between 1 and 100 (got {self.jpeg_quality})")


@dataclass
class SynthReport:
    """What :func:`generate_synthetic` did."""

    root: Path
    seen: list[str]
    unseen: list[str]
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    bytes_on_disk: int = 0
    files: list[Path] = field(default_factory=list, repr=False)


# ----------------------------------------------------------------------------- classes and split


def all_classes() -> list[ClassSpec]:
    """Every combination of the part vocabulary, in a fixed order."""
    return [ClassSpec(*c) for c in itertools.product(SHAPES, SPOKES, INNERS, ATTACHES)]


def make_classes(config: SynthConfig) -> tuple[list[ClassSpec], list[ClassSpec]]:
    """Choose ``config.classes`` combinations and split them into (seen, unseen), both sorted by name.

    Deterministic in ``config.seed``. The split is redrawn until every part value used by an unseen
    class also occurs in a seen class (so zero-shot classes are new *combinations*, not new parts),
    when that is possible at all.
    """
    config.validate()
    rng = np.random.default_rng([config.seed, 0x5EED])
    pool = all_classes()
    chosen = [pool[i] for i in rng.permutation(len(pool))[: config.classes]]
    best: tuple[list[ClassSpec], list[ClassSpec]] | None = None
    best_missing = math.inf
    for _ in range(200):
        order = rng.permutation(len(chosen))
        unseen = [chosen[i] for i in order[: config.unseen]]
        seen = [chosen[i] for i in order[config.unseen :]]
        seen_parts = {p for c in seen for p in c.parts()}
        missing = sum(p not in seen_parts for c in unseen for p in c.parts())
        if missing < best_missing:
            best, best_missing = (seen, unseen), missing
        if missing == 0:
            break
    assert best is not None
    seen, unseen = best
    return sorted(seen, key=lambda c: c.name), sorted(unseen, key=lambda c: c.name)


# ----------------------------------------------------------------------------- geometry

Poly = np.ndarray  # float64 [N, 2], local object coordinates, y pointing down, body radius ~1


@dataclass
class _Part:
    """One drawable piece of an object in local coordinates."""

    points: Poly
    closed: bool
    role: str  # body | line | knob | mark | dot | hole


def _circle(cx: float, cy: float, r: float, n: int = 40) -> Poly:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _regular(n: int, r: float, rot: float = -math.pi / 2) -> Poly:
    t = rot + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _outline(shape: str) -> Poly:
    if shape == "circle":
        return _circle(0, 0, 1.0, 48)
    if shape == "square":
        return np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])
    if shape == "tri":
        return _regular(3, 1.2) + np.array([0.0, 0.2])
    if shape == "hex":
        return _regular(6, 1.0, 0.0)
    if shape == "star":
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.15, 0.55)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if shape == "diamond":
        return np.array([[0.0, -1.15], [0.8, 0.0], [0.0, 1.15], [-0.8, 0.0]])
    raise ValueError(f"unknown shape {shape!r}")


_MARK_SCALE = {"circle": 1.0, "square": 1.0, "hex": 1.0, "diamond": 0.75, "tri": 0.7, "star": 0.65}


def _ray_hit(poly: Poly, origin: Sequence[float], direction: Sequence[float]) -> float:
    """Distance from ``origin`` along ``direction`` (unit) to the farthest crossing of the closed polygon."""
    o = np.asarray(origin, dtype=np.float64)
    d = np.asarray(direction, dtype=np.float64)
    best = 0.0
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        e = q - p
        den = d[0] * (-e[1]) - d[1] * (-e[0])
        if abs(den) < 1e-12:
            continue
        w = p - o
        t = (w[0] * (-e[1]) - w[1] * (-e[0])) / den
        s = (d[0] * w[1] - d[1] * w[0]) / den
        if t > 0 and 0 <= s <= 1:
            best = max(best, t)
    return best


def object_parts(spec: ClassSpec) -> list[_Part]:
    """The parts of one class's object, in drawing order (behind first), in local coordinates."""
    body = _outline(spec.shape)
    parts: list[_Part] = []
    # spokes with a knob at the end (behind the body)
    for i in range(spec.spokes):
        a = math.pi / 4 + i * 2 * math.pi / spec.spokes
        d = (math.cos(a), math.sin(a))
        r0 = _ray_hit(body, (0, 0), d)
        r1 = r0 + 0.45
        parts.append(_Part(np.array([[r0 * d[0], r0 * d[1]], [r1 * d[0], r1 * d[1]]]), False, "line"))
        parts.append(_Part(_circle((r1 + 0.15) * d[0], (r1 + 0.15) * d[1], 0.15, 16), True, "knob"))
    # attachment
    if spec.attach == "handle":
        top = _ray_hit(body, (0, 0), (0, -1))
        t = np.linspace(math.pi, 2 * math.pi, 20)
        parts.append(_Part(np.stack([0.5 * np.cos(t), -top + 0.15 + 0.6 * np.sin(t)], 1), False, "line"))
    elif spec.attach == "legs":
        for sx in (-1.0, 1.0):
            x = 0.4 * sx * _MARK_SCALE[spec.shape]
            b = _ray_hit(body, (x, 0), (0, 1)) or _ray_hit(body, (0, 0), (0, 1))
            pts = np.array([[x, b - 0.05], [x, b + 0.6], [x + 0.3 * sx, b + 0.6]])
            parts.append(_Part(pts, False, "line"))
    elif spec.attach == "tail":
        right = _ray_hit(body, (0, 0), (1, 0))
        tx = np.linspace(0, 0.9, 20)
        parts.append(_Part(np.stack([right - 0.05 + tx, 0.18 * np.sin(tx * 2 * math.pi / 0.6)], 1), False, "line"))
    parts.append(_Part(body, True, "body"))
    # inner marking
    m = _MARK_SCALE[spec.shape]
    if spec.inner == "dot":
        parts.append(_Part(_circle(0, 0, 0.22 * m, 20), True, "dot"))
    elif spec.inner == "cross":
        parts.append(_Part(np.array([[-0.5, 0.0], [0.5, 0.0]]) * m, False, "mark"))
        parts.append(_Part(np.array([[0.0, -0.5], [0.0, 0.5]]) * m, False, "mark"))
    elif spec.inner == "bars":
        for x in (-0.3, 0.0, 0.3):
            parts.append(_Part(np.array([[x, -0.42], [x, 0.42]]) * m, False, "mark"))
    elif spec.inner == "ring":
        parts.append(_Part(_circle(0, 0, 0.45 * m, 32), False, "mark"))
    elif spec.inner == "hole":
        h = 0.28 * m
        parts.append(_Part(np.array([[-h, -h], [h, -h], [h, h], [-h, h]]), True, "hole"))
    return parts


def _resample(points: Poly, closed: bool, step: float) -> Poly:
    """Points along the polyline about ``step`` apart (closed polylines end at their start)."""
    pts = np.vstack([points, points[:1]]) if closed else points
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    total = cum[-1]
    if total <= 0:
        return pts.copy()
    n = max(2, math.ceil(total / step) + 1)
    s = np.linspace(0.0, total, n)
    return np.stack([np.interp(s, cum, pts[:, 0]), np.interp(s, cum, pts[:, 1])], axis=1)


def _transform(points: Poly, scale: float, aspect: float, rot: float, center: tuple[float, float]) -> Poly:
    p = points * np.array([scale * aspect, scale / aspect])
    c, s = math.cos(rot), math.sin(rot)
    p = p @ np.array([[c, s], [-s, c]])
    return p + np.asarray(center)


def _xy(points: Poly) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points]


# ----------------------------------------------------------------------------- photos


def _random_color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    c = rng.integers(lo, hi, size=3)
    return (int(c[0]), int(c[1]), int(c[2]))


def _texture(rng: np.random.Generator, n: int, difficulty: float) -> np.ndarray:
    """A random background-like texture, uint8 [n, n, 3]."""
    kind = rng.integers(0, 4)
    c1 = np.array(_random_color(rng), dtype=np.float32)
    c2 = np.array(_random_color(rng), dtype=np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    if kind == 0:  # solid
        t = np.zeros((n, n), np.float32)
    elif kind == 1:  # linear gradient
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a)) * 0.7 + 0.15
    elif kind == 2:  # smooth noise
        k = int(rng.integers(3, 9))
        small = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8))
        t = np.asarray(small.resize((n, n), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    else:  # stripes
        a = rng.uniform(0, math.pi)
        f = rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * f * 2 * math.pi)
        t = t * rng.uniform(0.3, 0.8)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    grain = rng.normal(0.0, 4 + 10 * difficulty, size=(n, n, 1)).astype(np.float32)
    return np.clip(img + grain, 0, 255).astype(np.uint8)


def _shade(rng: np.random.Generator, n: int, color: tuple[int, int, int]) -> np.ndarray:
    """A shaded fill (light to dark across a random direction, optional stripes), uint8 [n, n, 3]."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    a = rng.uniform(0, 2 * math.pi)
    light = 0.55 + 0.7 * (xx * math.cos(a) + yy * math.sin(a) - 0.5 * (math.cos(a) + math.sin(a)) + 0.5) * 0.8
    img = np.asarray(color, np.float32)[None, None, :] * light[..., None]
    if rng.random() < 0.35:  # striped or dotted pattern on the surface
        b = rng.uniform(0, math.pi)
        f = rng.uniform(8, 20)
        stripes = np.sin((xx * math.cos(b) + yy * math.sin(b)) * f * 2 * math.pi) > 0.3
        img = np.where(stripes[..., None], img * 0.6, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_clutter(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, n: int, count: int, max_r: float, lw: int
) -> None:
    for _ in range(count):
        cx, cy = rng.uniform(0, n, size=2)
        r = rng.uniform(0.04, max_r) * n
        col = _random_color(rng)
        kind = rng.integers(0, 5)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)], fill=col)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r * rng.uniform(0.3, 1)], fill=col)
        elif kind == 2:
            a = rng.uniform(0, 2 * math.pi)
            draw.line([(cx, cy), (cx + 2 * r * math.cos(a), cy + 2 * r * math.sin(a))], fill=col, width=lw)
        elif kind == 3:  # a loose part from the shared vocabulary: knob on a stick
            a = rng.uniform(0, 2 * math.pi)
            ex, ey = cx + r * math.cos(a), cy + r * math.sin(a)
            draw.line([(cx, cy), (ex, ey)], fill=col, width=lw)
            k = 0.3 * r
            draw.ellipse([ex - k, ey - k, ex + k, ey + k], fill=col)
        else:  # a loose ring or polygon outline
            m = int(rng.integers(3, 7))
            pts = _regular(m, r, rng.uniform(0, math.pi)) + np.array([cx, cy])
            draw.polygon(_xy(pts), outline=col, width=lw)


def render_photo(spec: ClassSpec, rng: np.random.Generator, size: int, difficulty: float = 0.5) -> Image.Image:
    """Render one photo of ``spec``: shaded object in random colours, pose and clutter. RGB image."""
    n = size * _SUPERSAMPLE
    bg = _texture(rng, n, difficulty)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    lw = max(2, round(n * 0.025))
    _draw_clutter(rng, draw, n, int(rng.poisson(1 + 4 * difficulty)), 0.12 + 0.1 * difficulty, lw)

    scale = n * rng.uniform(0.16, 0.25)
    aspect = math.exp(rng.uniform(-0.2, 0.2))
    rot = rng.uniform(-1, 1) * math.radians(25 + 155 * difficulty)
    margin = 1.7 * scale
    center = (
        float(rng.uniform(margin, n - margin)) if n > 2 * margin else n / 2,
        float(rng.uniform(margin, n - margin)) if n > 2 * margin else n / 2,
    )
    body_col = _random_color(rng, 30, 256)
    part_col = tuple(int(c * rng.uniform(0.25, 0.6)) for c in body_col) if rng.random() < 0.6 else _random_color(rng)
    mark_col = tuple(255 - c for c in body_col) if rng.random() < 0.5 else _random_color(rng)
    plw = max(2, round(scale * rng.uniform(0.1, 0.16)))
    mlw = max(2, round(scale * rng.uniform(0.08, 0.14)))

    for part in object_parts(spec):
        pts = _transform(part.points, scale, aspect, rot, center)
        if part.role == "body":
            mask = Image.new("L", (n, n), 0)
            ImageDraw.Draw(mask).polygon(_xy(pts), fill=255)
            fill = Image.fromarray(_shade(rng, n, body_col), "RGB")
            img.paste(fill, (0, 0), mask)
            if rng.random() < 0.5:
                draw.polygon(_xy(pts), outline=part_col, width=max(1, lw // 2))
        elif part.role == "line":
            draw.line(_xy(pts), fill=part_col, width=plw, joint="curve")
        elif part.role == "knob":
            draw.polygon(_xy(pts), fill=part_col)
        elif part.role == "mark":
            draw.line(_xy(np.vstack([pts, pts[:1]]) if part.closed or len(pts) > 8 else pts), fill=mark_col, width=mlw)
        elif part.role == "dot":
            draw.polygon(_xy(pts), fill=mark_col)
        elif part.role == "hole":  # see-through: show the background
            mask = Image.new("L", (n, n), 0)
            ImageDraw.Draw(mask).polygon(_xy(pts), fill=255)
            img.paste(Image.fromarray(bg, "RGB"), (0, 0), mask)

    # a few small occluders in front
    _draw_clutter(rng, draw, n, int(rng.poisson(1.5 * difficulty)), 0.06, lw)
    img = img.resize((size, size), Image.Resampling.BOX)
    if rng.random() < 0.3 + 0.4 * difficulty:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.6 + difficulty)))
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.75, 1.2)
    arr += rng.normal(0.0, 2 + 6 * difficulty, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- sketches


def _stroke(rng: np.random.Generator, pts: Poly, closed: bool, wobble: float) -> Poly:
    """A hand-drawn version of a polyline: resampled, wobbled, jittered, overshooting at the ends."""
    p = _resample(pts, closed, 0.06)
    if closed:  # start anywhere, end with a small gap or overlap
        k = int(rng.integers(0, len(p) - 1))
        p = np.vstack([p[k:-1], p[: k + 1]])
        extra = int(rng.integers(-2, 4))
        p = p[: len(p) + extra] if extra < 0 else np.vstack([p, p[1 : 1 + extra]])
    if len(p) < 2:
        return p
    d = np.gradient(p, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], 1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
    s = np.linspace(0, 1, len(p))
    length = float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())
    wobble *= min(1.0, 0.3 + length / 3.0)  # short strokes wobble less
    off = np.zeros(len(p))
    for _ in range(2):
        off += rng.uniform(-1, 1) * wobble * np.sin(2 * math.pi * (rng.uniform(0.5, 2.5) * s + rng.random()))
    off += rng.normal(0, wobble * 0.25, len(p))
    return p + normal * off[:, None]


def render_sketch(spec: ClassSpec, rng: np.random.Generator, size: int, difficulty: float = 0.5) -> Image.Image:
    """Render one sketch of ``spec``: sparse dark strokes on white, category level. Grayscale image."""
    n = size * _SUPERSAMPLE
    img = Image.new("L", (n, n), 255)
    draw = ImageDraw.Draw(img)
    scale = n * rng.uniform(0.2, 0.26)
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    rot = rng.uniform(-1, 1) * math.radians(8 + 22 * difficulty)
    center = (n / 2 + rng.uniform(-0.06, 0.06) * n, n / 2 + rng.uniform(-0.06, 0.06) * n)
    width = max(1, round(n * rng.uniform(0.008, 0.02)))
    ink = int(rng.integers(0, 70))
    wobble = 0.02 + 0.05 * difficulty
    p_drop = 0.04 + 0.16 * difficulty

    for part in object_parts(spec):
        stroke = _stroke(rng, part.points, part.closed, wobble)
        if part.role == "dot" and rng.random() < 0.6:  # scribble the dot in
            stroke = np.vstack([stroke, stroke[::2] * 0.5])
        pts = _transform(stroke, scale, aspect, rot, center)
        # broken strokes: cut the stroke into pieces and drop some of them
        pieces = max(1, len(pts) // int(rng.integers(6, 14)))
        cuts = np.array_split(np.arange(len(pts)), pieces)
        for idx in cuts:
            if len(idx) < 2 or (part.role != "body" and rng.random() < p_drop) or rng.random() < p_drop * 0.5:
                continue
            seg = pts[max(0, idx[0] - 1) : idx[-1] + 1]
            w = max(1, width + int(rng.integers(-1, 2)))
            draw.line(_xy(seg), fill=ink + int(rng.integers(0, 40)), width=w, joint="curve")
    if rng.random() < 0.5 * difficulty:  # a stray stroke
        a, b = rng.uniform(0.15, 0.85, size=(2, 2)) * n
        draw.line([tuple(a), tuple(b)], fill=ink, width=width)
    return img.resize((size, size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- writing


def image_rng(seed: int, class_name: str, domain: str, index: int) -> np.random.Generator:
    """The random generator of one image, a pure function of (seed, class, domain, index)."""
    return np.random.default_rng([seed, zlib.crc32(class_name.encode()), _DOMAIN_ID[domain], index])


def image_relpath(class_name: str, domain: str, index: int) -> str:
    """Path of one image relative to the benchmark root."""
    ext = "jpg" if domain == PHOTO else "png"
    return f"{domain}/{class_name}/{class_name}_{index:04d}.{ext}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _encode(img: Image.Image, domain: str, quality: int) -> bytes:
    import io

    buf = io.BytesIO()
    if domain == PHOTO:
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def render_image(config: SynthConfig, class_name: str, domain: str, index: int) -> Image.Image:
    """Render one image of the benchmark (deterministic; the same call always gives the same pixels)."""
    spec = ClassSpec.from_name(class_name)
    rng = image_rng(config.seed, class_name, domain, index)
    if domain == PHOTO:
        return render_photo(spec, rng, config.size, config.difficulty)
    if domain == SKETCH:
        return render_sketch(spec, rng, config.size, config.difficulty)
    raise ValueError(f"domain must be 'photo' or 'sketch', not {domain!r}")


_Task = tuple[str, str, int]


def _work(args: tuple[str, SynthConfig, list[_Task]]) -> int:
    root, config, tasks = args
    for class_name, domain, index in tasks:
        img = render_image(config, class_name, domain, index)
        _atomic_write_bytes(
            Path(root) / image_relpath(class_name, domain, index), _encode(img, domain, config.jpeg_quality)
        )
    return len(tasks)


def _chunks(tasks: list[_Task], size: int) -> Iterator[list[_Task]]:
    for i in range(0, len(tasks), size):
        yield tasks[i : i + size]


def meta_for(config: SynthConfig, seen: list[ClassSpec], unseen: list[ClassSpec]) -> dict[str, object]:
    """The ``meta.json`` content of a benchmark (no timestamps, so it is reproducible)."""
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": config.seed,
        "params": asdict(config),
        "vocabulary": {"shape": list(SHAPES), "spokes": list(SPOKES), "inner": list(INNERS), "attach": list(ATTACHES)},
        "domains": {"photo": {"ext": "jpg", "tag": 1}, "sketch": {"ext": "png", "tag": 0}},
        "counts": {
            "classes": config.classes,
            "seen": len(seen),
            "unseen": len(unseen),
            "photos": config.classes * config.photos_per_class,
            "sketches": config.classes * config.sketches_per_class,
        },
    }


def generate_synthetic(
    out: str | os.PathLike[str],
    config: SynthConfig | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> SynthReport:
    """Write (or complete) a synthetic benchmark at ``out``; see the module docstring for the layout.

    Existing images are kept (resume). If ``out/meta.json`` exists but was written with other
    parameters, raises ``ValueError`` instead of mixing two benchmarks in one folder.
    ``workers``: processes to render with (default: CPU count; 1 renders in this process).
    """
    import time

    config = config or SynthConfig()
    config.validate()
    root = Path(out)
    start = time.perf_counter()
    seen, unseen = make_classes(config)
    meta = meta_for(config, seen, unseen)
    meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    meta_path = root / "meta.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{meta_path} exists but is not readable JSON ({e}); remove it or choose another folder"
            ) from e
        if old != meta:
            raise ValueError(
                f"{root} already holds a benchmark made with other parameters "
                f"({old.get('generator')} params={old.get('params')}); choose another folder or delete it"
            )
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and has no meta.json: refusing to write a benchmark into it")
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(meta_path, meta_text.encode())
    _atomic_write_bytes(root / "splits" / "seen.txt", "".join(c.name + "\n" for c in seen).encode())
    _atomic_write_bytes(root / "splits" / "unseen.txt", "".join(c.name + "\n" for c in unseen).encode())

    names = sorted(c.name for c in seen + unseen)
    all_tasks: list[_Task] = [(c, PHOTO, i) for c in names for i in range(config.photos_per_class)]
    all_tasks += [(c, SKETCH, i) for c in names for i in range(config.sketches_per_class)]
    todo = [t for t in all_tasks if not (root / image_relpath(*t)).exists()]
    report = SynthReport(root=root, seen=[c.name for c in seen], unseen=[c.name for c in unseen])
    report.skipped = len(all_tasks) - len(todo)

    from tqdm import tqdm

    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = tqdm(total=len(all_tasks), initial=report.skipped, unit="img", desc="synth", disable=not progress)
    try:
        if n_workers == 1 or len(todo) < 64:
            for chunk in _chunks(todo, 16):
                bar.update(_work((str(root), config, chunk)))
        else:
            chunk_size = max(8, min(64, len(todo) // (n_workers * 8) or 8))
            jobs = [(str(root), config, c) for c in _chunks(todo, chunk_size)]
            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                for done in pool.map(_work, jobs):
                    bar.update(done)
    finally:
        bar.close()
    report.written = len(todo)
    report.files = [root / image_relpath(*t) for t in all_tasks]
    report.bytes_on_disk = sum(p.stat().st_size for p in report.files)
    report.seconds = time.perf_counter() - start
    return report
