"""Synthetic videos with exact ground truth, for training and evaluating LLaVA-Mini Stream.

A scene is a deterministic function of an integer seed (plus a few knobs).  It is used
(a) to train a tiny demo LLaVA-Mini checkpoint on CPU and (b) to measure accuracy per
question family on held-out seeds at 60 s, 10 min and 3 h (10,800 frames at 1 frame/s).
Everything a question asks is computed from the scene description (`SceneSpec`), never
from pixels, and the pixels are a pure function of the description, so the answers are
exact.  Nothing is held in memory beyond one frame: a 3-hour scene streams.

The world
---------
* **Canvas and time.**  ``width x height`` pixels (default 64x64; 96 or 128 work too).
  Frame ``i`` shows time ``t = i / fps`` for ``i in range(n_frames)`` with
  ``n_frames = floor(duration_s * fps)`` (default ``fps = 1.0``, the model's sampling
  rate; higher rates are for video-file tests).  `render_frame` accepts any ``t``: the
  world is continuous in time.
* **Background** (one per video, chosen by the seed): a solid colour, a gentle linear
  gradient between two colours, or a solid colour with light static noise (a fixed
  texture, amplitude 4..10).  Background colours come from a *dark* palette (every channel
  <= 60, <= 70 with noise) so no background pixel ever equals an object colour (every
  object colour has a channel >= 200).
* **Objects** (1..5 distinct objects per video over its whole duration, at most 3 on
  screen at once).  Each has a *kind* from {circle, square, triangle, cross}, a *colour*
  from {red, green, blue, yellow, white, purple, orange} and a *size* {small, large}
  (bounding radius 9 % or 15 % of the shorter side).  No two objects share the same
  (kind, colour) pair, counting colours an object takes after a colour change, so
  "the <colour> <kind>" always names one object.  An object appears at an integer
  second ``t_appear`` (visible while ``t_appear <= t < t_leave``; ``t_leave`` is None when
  it stays to the end), is on screen for at least 3 s, and moves along a straight line
  at constant speed (0..5 % of the shorter side per second), bouncing off the frame
  edges (a closed-form triangle wave, so any ``t`` costs O(1)).  Long videos are a
  schedule of segments: appearance times are spread over the whole video and objects
  leave to keep the on-screen count <= 3, so the screen may be empty for a while.
  Objects are drawn in appearance order (a later object covers an earlier one); shapes
  are hard-edged (no anti-aliasing): every pixel of an object has exactly its colour.
* **Events** (`Event`, sorted by time): ``appear``, ``leave``, ``change_colour`` (at most
  one object per video, p = 0.3, at an integer second, >= 3 s after it appears and
  >= 3 s before it leaves; ``info`` holds ``from``/``to``), ``collide`` (two objects'
  rendered pixel masks overlap; evaluated on the frame grid ``t = i / fps`` with the
  very masks the renderer paints, merged into runs of consecutive frames:
  ``[t, t_end)``), and ``needle``.
* **Needle** (``needle=True``/``False``, or None: a coin flip of the seed).  A static
  *star* (a kind never otherwise used) in a colour that no other object in the video
  ever has when one is left, visible for only 3..5 s (integer start second, placed
  uniformly between 5 % and 95 % of the video), drawn above everything.  It takes
  part in no family other than "needle" (it is not counted by "count") and in no
  collision.  `label_map` labels it ``spec.needle_label``.
* **Seeds and durations.**  The random draws are split into independent streams
  (background, schedule, object looks and paths, colour change, needle), so one seed
  at 60 s, 10 min and 3 h gives the same background and the same objects (kind, colour,
  size, start point, velocity) with the schedule scaled to the duration (very short
  videos may hold fewer objects), which isolates the effect of length.  Keep training
  and evaluation seeds disjoint.

Question families (`questions`)
-------------------------------
Every referent is named as "<colour> <kind>" with the colour it has when it appears.
Templates are fixed and lower case; yes/no families pick the polarity by a fair coin,
and a family whose drawn polarity (or whose referent) does not exist in the video is
skipped, so yes/no stay balanced over a data set.

==========  ============================================  =================================
family      question                                      answer rule
==========  ============================================  =================================
colour      what colour is the <kind>?                    colour word.  Only asked when
                                                          exactly one object of that kind
                                                          exists and it never changes
                                                          colour.
shape       what shape is the <colour> object?            kind word.  Only when exactly one
                                                          object (the needle included) ever
                                                          has that colour and it is not the
                                                          needle.
exists      is there a <colour> <kind>?                   "yes" if some non-needle object
                                                          of that kind has that colour at
                                                          some time, else "no"; a coin
                                                          picks a present or an absent
                                                          (kind from the four, colour from
                                                          the palette) combination.
count       how many objects are there?                   number of distinct objects over
                                                          the whole video, the needle star
                                                          not counted (1..5), as digits.
order       which appeared first, the <c1> <k1> or the    "<colour> <kind>" of the earlier
            <c2> <k2>?                                    one; only pairs whose appearance
                                                          times differ by >= 3 s; the two
                                                          are listed in random order.
when        when did the <colour> <kind> appear?          floor(t_appear) in seconds, as
                                                          digits; scored within
                                                          ``meta["tolerance_s"]`` (2 s).
needle      is there a <colour> star?                     needle video: "yes" (its colour);
            when did the <colour> star appear?            otherwise "no" (random colour).
                                                          The "when" form (needle videos
                                                          only): floor of its start, +-2 s.
change      what colour did the <colour> <kind> change    the new colour (only videos with
            to?                                           a colour change).
collide     did the <c1> <k1> and the <c2> <k2> collide?  "yes" if a ``collide`` event
                                                          joins them; the "no" pairs are
                                                          objects on screen together at
                                                          some frame that never overlap.
==========  ============================================  =================================

Words and scoring
-----------------
`tokenize_words` lower-cases, maps a few synonyms (color -> colour, gray -> grey), splits
on whitespace and punctuation (punctuation is dropped) and splits every number larger
than ``max_number`` (default `MAX_WHOLE_NUMBER` = 9) into single digits, so "3h" answers
like 10799 become ``1 0 7 9 9`` and the vocabulary stays small.  `vocabulary` lists every
token any question, answer or choice can produce (the template words, colour and kind
words, yes/no and the numbers 0..max_number).  `detokenize_words` joins digit runs back.
`score` compares a prediction with the answer after that normalisation (articles
"the/a/an" dropped, number words one..ten mapped to digits); numeric families ("when",
needle-when) parse the first number and accept ``|pred - answer| <= tolerance_s``.

Video files
-----------
`write_video` streams frames into a real MP4 through PyAV: H.264 (``libx264``, yuv420p,
preset ultrafast) when the PyAV build has it, else MPEG-4 Part 2 (``mpeg4``) with a
warning.  Width and height must be even.  A 3-hour 64x64 scene (10,800 frames) writes in
a few seconds on one CPU core.

Run ``python -m stream.synthetic --seed 0 --duration 60 --out /tmp/s0.mp4`` to write a
video and print its questions as JSON lines.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = [
    "KINDS", "NEEDLE_KIND", "COLOURS", "PALETTES", "check_palette", "SIZES", "FAMILIES", "MAX_WHOLE_NUMBER",
    "Background", "ObjectSpec", "Needle", "Event", "SceneSpec", "QA",
    "make_scene", "render_frame", "iter_frames", "render_frames", "label_map",
    "object_mask", "visible_objects", "write_video", "questions", "vocabulary",
    "tokenize_words", "detokenize_words", "normalize_answer", "score",
]

# --------------------------------------------------------------------------- constants

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
NEEDLE_KIND = "star"
ALL_KINDS: tuple[str, ...] = KINDS + (NEEDLE_KIND,)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (170, 60, 230),
    "orange": (255, 140, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

#: Other renderings of the same seven colour names, for measuring (and training) how a model
#: copes with a generator or camera whose "red" is not this module's (`SceneSpec.palette`,
#: `make_scene(..., palette=...)`).  "css": the CSS / X11 named colours, as a generator written
#: with those names would paint them (green and purple are half as bright as here); "vivid":
#: other bright CSS shades (crimson, lime green, dodger blue, gold, dark violet, dark orange).
PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "default": dict(COLOURS),
    "css": {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
            "white": (255, 255, 255), "purple": (128, 0, 128), "orange": (255, 165, 0)},
    "vivid": {"red": (220, 20, 60), "green": (50, 205, 50), "blue": (30, 144, 255), "yellow": (255, 215, 0),
              "white": (255, 255, 255), "purple": (148, 0, 211), "orange": (255, 140, 0)},
}


def check_palette(palette) -> dict[str, tuple[int, int, int]] | None:
    """A palette (colour name -> RGB) as `SceneSpec.palette` holds it, or None; a clear error
    naming what is wrong otherwise.  Every one of the seven names must be there."""
    if palette is None:
        return None
    if isinstance(palette, str):
        if palette not in PALETTES:
            raise ValueError(f"unknown palette {palette!r}; known: {sorted(PALETTES)}")
        palette = PALETTES[palette]
    out = {}
    for name in COLOUR_NAMES:
        if name not in palette:
            raise ValueError(f"palette lacks {name!r}: expected RGB for each of {list(COLOUR_NAMES)}")
        rgb = tuple(int(v) for v in palette[name])
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError(f"palette {name!r}: expected three values 0..255, got {palette[name]!r}")
        out[name] = rgb
    extra = set(palette) - set(COLOUR_NAMES)
    if extra:
        raise ValueError(f"palette has unknown colour names {sorted(extra)}; known: {list(COLOUR_NAMES)}")
    return out

# Dark background palette (names are internal, never in questions).
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (8, 8, 8),
    "charcoal": (45, 45, 45),
    "navy": (18, 26, 60),
    "teal": (12, 48, 48),
    "brown": (55, 35, 18),
    "olive": (44, 50, 18),
    "plum": (48, 18, 46),
}
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "noise")

SIZES: dict[str, float] = {"small": 0.09, "large": 0.15}  # bounding radius / min(W, H)
NEEDLE_RADIUS = 0.14

FAMILIES: tuple[str, ...] = (
    "colour", "shape", "exists", "count", "order", "when", "needle", "change", "collide",
)
NUMERIC_FAMILIES = ("when",)  # plus needle questions with meta["numeric"]

MAX_OBJECTS = 5
MAX_CONCURRENT = 3
MIN_VISIBLE_S = 3
ORDER_MIN_GAP_S = 3
WHEN_TOLERANCE_S = 2.0
MAX_WHOLE_NUMBER = 9

_KNOB_DEFAULTS: dict[str, Any] = {
    "n_objects": None,          # distinct non-needle objects; None: uniform 1..max_objects
    "max_objects": MAX_OBJECTS,
    "max_concurrent": MAX_CONCURRENT,
    "p_change": 0.3,            # probability that one object changes colour
    "p_needle": 0.5,            # used when needle=None
    "speed": (0.0, 0.05),       # px/s as a fraction of min(W, H)
    "needle_seconds": (3, 5),   # inclusive range of the needle's visible duration
    "kinds": KINDS,
    "colours": COLOUR_NAMES,
    "background": None,         # force "solid" | "gradient" | "noise"
}


# --------------------------------------------------------------------------- data model

@dataclass(frozen=True)
class Background:
    """Per-video background: ``kind`` in {solid, gradient, noise}."""

    kind: str
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int] = (0, 0, 0)   # gradient end colour
    angle: float = 0.0                            # gradient direction, radians
    noise_seed: int = 0
    noise_amp: int = 0


@dataclass
class ObjectSpec:
    """One object.  Position at time t: bounce(x0 + vx * (t - t_appear)) per axis."""

    kind: str
    colour: str                      # colour when it appears
    size: str                        # "small" | "large"
    radius: float                    # bounding radius in pixels
    x0: float
    y0: float
    vx: float                        # pixels per second
    vy: float
    t_appear: float
    t_leave: float | None = None     # None: stays to the end
    change_t: float | None = None
    change_colour: str | None = None

    def visible(self, t: float) -> bool:
        return self.t_appear <= t and (self.t_leave is None or t < self.t_leave)

    def colour_at(self, t: float) -> str:
        if self.change_t is not None and t >= self.change_t:
            return self.change_colour  # type: ignore[return-value]
        return self.colour

    def colours(self) -> tuple[str, ...]:
        """Every colour it ever has."""
        return (self.colour,) if self.change_colour is None else (self.colour, self.change_colour)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Needle:
    """The rare event: a static star visible during ``[t_appear, t_leave)``."""

    colour: str
    x: float
    y: float
    radius: float
    t_appear: float
    t_leave: float
    kind: str = NEEDLE_KIND

    def visible(self, t: float) -> bool:
        return self.t_appear <= t < self.t_leave

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Event:
    """``kind`` in {appear, leave, change_colour, collide, needle}.

    ``objects`` are indices into ``SceneSpec.objects`` (empty for the needle);
    ``t_end`` (exclusive) is set for ``collide`` and ``needle``.
    """

    kind: str
    t: float
    objects: tuple[int, ...] = ()
    t_end: float | None = None
    info: dict = field(default_factory=dict)


@dataclass
class SceneSpec:
    seed: int
    duration_s: float
    fps: float
    width: int
    height: int
    background: Background
    objects: list[ObjectSpec]
    events: list[Event]
    needle: Needle | None = None
    #: RGB per colour name used to paint objects; None: `COLOURS`.  Questions and answers use the
    #: names, so a palette changes pixels only.
    palette: dict[str, tuple[int, int, int]] | None = None

    def rgb(self, colour: str) -> tuple[int, int, int]:
        return (self.palette or COLOURS)[colour]

    @property
    def n_frames(self) -> int:
        return int(math.floor(self.duration_s * self.fps + 1e-9))

    @property
    def needle_label(self) -> int:
        """Label of the needle in `label_map` (one past the last object)."""
        return len(self.objects)

    def n_distinct(self) -> int:
        """Distinct objects over the whole video, the needle not counted."""
        return len(self.objects)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SceneSpec":
        bg = dict(d["background"])
        bg["colour_a"], bg["colour_b"] = tuple(bg["colour_a"]), tuple(bg["colour_b"])
        return cls(
            seed=d["seed"], duration_s=d["duration_s"], fps=d["fps"],
            width=d["width"], height=d["height"], background=Background(**bg),
            objects=[ObjectSpec(**o) for o in d["objects"]],
            events=[Event(**{**e, "objects": tuple(e["objects"])}) for e in d["events"]],
            needle=Needle(**d["needle"]) if d.get("needle") else None,
            palette=check_palette(d.get("palette")),
        )


@dataclass
class QA:
    family: str
    question: str
    answer: str
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- geometry

def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect p into [lo, hi] (triangle wave); works on scalars and arrays alike."""
    span = hi - lo
    if span <= 0:
        return np.full_like(p, (lo + hi) / 2.0)
    m = np.mod(p - lo, 2.0 * span)
    return lo + np.where(m <= span, m, 2.0 * span - m)


def _position(obj: ObjectSpec, t, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) at time(s) t.  Same float64 code path for scalars and arrays."""
    t = np.asarray(t, dtype=np.float64)
    dt = t - obj.t_appear
    r = obj.radius
    x = _bounce(obj.x0 + obj.vx * dt, r, width - r)
    y = _bounce(obj.y0 + obj.vy * dt, r, height - r)
    return x, y


def _convex(dx: np.ndarray, dy: np.ndarray, verts: Sequence[tuple[float, float]]) -> np.ndarray:
    pos = np.ones(np.broadcast(dx, dy).shape, dtype=bool)
    neg = pos.copy()
    n = len(verts)
    for k in range(n):
        (px, py), (qx, qy) = verts[k], verts[(k + 1) % n]
        c = (qx - px) * (dy - py) - (qy - py) * (dx - px)
        pos &= c >= 0
        neg &= c <= 0
    return pos | neg


@functools.lru_cache(maxsize=None)
def _unit_polys(kind: str) -> tuple[tuple[tuple[float, float], ...], ...]:
    """Convex pieces of a shape of bounding radius 1 (y grows downwards)."""
    if kind == "triangle":
        s = math.sqrt(3.0) / 2.0
        return (((0.0, -1.0), (s, 0.5), (-s, 0.5)),)
    if kind == "star":
        outer = [(math.cos(a), math.sin(a)) for a in
                 (-math.pi / 2 + k * 2 * math.pi / 5 for k in range(5))]
        ri = 0.42
        inner = [(ri * math.cos(a), ri * math.sin(a)) for a in
                 (-math.pi / 2 + math.pi / 5 + k * 2 * math.pi / 5 for k in range(5))]
        pieces = [tuple(inner)]
        for k in range(5):
            pieces.append((inner[k - 1], outer[k], inner[k]))
        return tuple(tuple(p) for p in pieces)
    raise ValueError(kind)


def _shape_region(kind: str, cx: float, cy: float, r: float, width: int, height: int
                  ) -> tuple[int, int, int, int, np.ndarray] | None:
    """Mask of a shape inside its clipped bounding box: (y0, y1, x0, x1, mask)."""
    x0, x1 = max(0, int(math.floor(cx - r))), min(width, int(math.ceil(cx + r)) + 1)
    y0, y1 = max(0, int(math.floor(cy - r))), min(height, int(math.ceil(cy + r)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    if kind == "circle":
        m = dx * dx + dy * dy <= r * r
    elif kind == "square":
        a = 0.72 * r
        m = (np.abs(dx) <= a) & (np.abs(dy) <= a)
    elif kind == "cross":
        w = 0.3 * r
        ax, ay = np.abs(dx), np.abs(dy)
        m = ((ax <= r) & (ay <= w)) | ((ax <= w) & (ay <= r))
    elif kind in ("triangle", "star"):
        m = np.zeros(np.broadcast(dx, dy).shape, dtype=bool)
        for poly in _unit_polys(kind):
            m |= _convex(dx, dy, [(r * px, r * py) for px, py in poly])
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return y0, y1, x0, x1, m


def _full_mask(region, width: int, height: int) -> np.ndarray:
    out = np.zeros((height, width), dtype=bool)
    if region is not None:
        y0, y1, x0, x1, m = region
        out[y0:y1, x0:x1] = m
    return out


def _object_region(spec: SceneSpec, i: int, t: float):
    o = spec.objects[i]
    x, y = _position(o, t, spec.width, spec.height)
    return _shape_region(o.kind, float(x), float(y), o.radius, spec.width, spec.height)


def _needle_region(spec: SceneSpec):
    n = spec.needle
    assert n is not None
    return _shape_region(n.kind, n.x, n.y, n.radius, spec.width, spec.height)


def _regions_overlap(a, b) -> bool:
    if a is None or b is None:
        return False
    ay0, ay1, ax0, ax1, am = a
    by0, by1, bx0, bx1, bm = b
    y0, y1, x0, x1 = max(ay0, by0), min(ay1, by1), max(ax0, bx0), min(ax1, bx1)
    if y0 >= y1 or x0 >= x1:
        return False
    sa = am[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
    sb = bm[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return bool(np.any(sa & sb))


# --------------------------------------------------------------------------- scene generation

def _int_between(rng: np.random.Generator, lo: float, hi: float) -> int:
    lo_i, hi_i = int(math.ceil(lo)), int(math.floor(hi))
    return lo_i if hi_i <= lo_i else int(rng.integers(lo_i, hi_i + 1))


def _make_background(rng: np.random.Generator, force: str | None) -> Background:
    kind = force or BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    if kind not in BACKGROUND_KINDS:
        raise ValueError(f"background must be one of {BACKGROUND_KINDS}, not {kind!r}")
    names = list(BACKGROUND_COLOURS)
    a, b = rng.choice(len(names), size=2, replace=False)
    ca, cb = BACKGROUND_COLOURS[names[a]], BACKGROUND_COLOURS[names[b]]
    if kind == "solid":
        return Background("solid", ca)
    if kind == "gradient":
        return Background("gradient", ca, cb, angle=float(rng.uniform(0, 2 * math.pi)))
    return Background("noise", ca, noise_seed=int(rng.integers(2**31)),
                      noise_amp=int(rng.integers(4, 11)))


@functools.lru_cache(maxsize=32)
def _background_image(bg: Background, width: int, height: int) -> np.ndarray:
    a = np.array(bg.colour_a, dtype=np.float64)
    if bg.kind == "solid":
        img = np.broadcast_to(a, (height, width, 3))
    elif bg.kind == "gradient":
        b = np.array(bg.colour_b, dtype=np.float64)
        xs = np.arange(width) + 0.5 - width / 2.0
        ys = np.arange(height) + 0.5 - height / 2.0
        c, s = math.cos(bg.angle), math.sin(bg.angle)
        proj = xs[None, :] * c + ys[:, None] * s
        ext = (abs(c) * width + abs(s) * height) / 2.0
        u = np.clip((proj + ext) / (2.0 * ext), 0.0, 1.0)[..., None]
        img = a * (1.0 - u) + b * u
    elif bg.kind == "noise":
        nrng = np.random.default_rng(bg.noise_seed)
        img = a + nrng.uniform(-bg.noise_amp, bg.noise_amp, size=(height, width, 1))
    else:
        raise ValueError(bg.kind)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


def _schedule(rng: np.random.Generator, n: int, duration: float, max_conc: int
              ) -> list[tuple[int, int | None]]:
    """(t_appear, t_leave) integer seconds, <= max_conc objects visible at once."""
    d = float(duration)
    last_start = int(math.floor(d - MIN_VISIBLE_S))
    if last_start < 0:
        raise ValueError(f"duration_s must be >= {MIN_VISIBLE_S} s, got {duration}")
    hi = max(0, min(last_start, int(math.floor(0.85 * d))))
    appears = sorted(int(rng.integers(0, hi + 1)) for _ in range(n))
    if n and rng.random() < 0.3:
        appears[0] = 0
    lo_life = max(MIN_VISIBLE_S, 0.15 * d)
    hi_life = max(lo_life, 0.6 * d)
    lives = [None if rng.random() < 0.35 else _int_between(rng, lo_life, hi_life)
             for _ in range(n)]
    out: list[list] = []
    for idx in range(n):
        a = max(appears[idx], out[-1][0] if out else 0)
        active = [j for j in range(len(out)) if out[j][1] is None or out[j][1] > a]
        while len(active) >= max_conc:
            j = min(active, key=lambda k: out[k][0])
            if a - out[j][0] < MIN_VISIBLE_S:
                a = out[j][0] + MIN_VISIBLE_S
            out[j][1] = a
            active = [k for k in active if out[k][1] is None or out[k][1] > a]
        if a > last_start:
            break
        leave = None if lives[idx] is None else a + lives[idx]
        if leave is not None and leave >= d:
            leave = None
        out.append([a, leave])
    return [(a, b) for a, b in out]


def make_scene(seed: int, duration_s: float, fps: float = 1.0, size: tuple[int, int] = (64, 64),
               needle: bool | None = None, palette=None, events: bool = True, **knobs) -> SceneSpec:
    """Build a scene, deterministically from ``seed`` (numpy Generator).

    ``size`` is (width, height).  ``palette``: a name in `PALETTES` or a dict colour name -> RGB
    (pixels only; the scene, its questions and answers are the same; no random draws).  ``needle``: True/False forces the needle event, None
    draws it with probability ``p_needle``.  Knobs (see ``_KNOB_DEFAULTS``): n_objects,
    max_objects, max_concurrent, p_change, p_needle, speed=(lo, hi), needle_seconds=(lo, hi),
    kinds, colours, background.  ``events=False`` leaves ``spec.events`` empty (no random draws are
    skipped, so the scene is the same): the collision search is most of the cost of a scene, and a
    caller that only renders frames or asks what is on screen does not need it.
    """
    unknown = set(knobs) - set(_KNOB_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown knobs {sorted(unknown)}; known: {sorted(_KNOB_DEFAULTS)}")
    k = {**_KNOB_DEFAULTS, **knobs}
    if fps <= 0:
        raise ValueError("fps must be > 0")
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16:
        raise ValueError("size must be at least 16x16")
    kinds = tuple(k["kinds"])
    colours = tuple(k["colours"])
    if not set(kinds) <= set(KINDS) or not set(colours) <= set(COLOURS):
        raise ValueError(f"kinds must come from {KINDS}, colours from {COLOUR_NAMES}")
    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng([int(seed), 0x5EED, k])

    rng = stream(0)
    d = float(duration_s)
    side = float(min(width, height))

    background = _make_background(rng, k["background"])
    has_needle = bool(rng.random() < k["p_needle"]) if needle is None else bool(needle)
    max_obj = int(k["max_objects"])
    n_reg = k["n_objects"]
    if n_reg is None:
        n_reg = int(rng.integers(1, max_obj + 1))
    n_reg = max(1, min(int(n_reg), len(kinds) * len(colours) - 1))

    sched = _schedule(stream(1), n_reg, d, int(k["max_concurrent"]))
    rng = stream(2)
    used: set[tuple[str, str]] = set()
    objects: list[ObjectSpec] = []
    s_lo, s_hi = k["speed"]
    for a, leave in sched:
        kind = kinds[int(rng.integers(len(kinds)))]
        free = [c for c in colours if (kind, c) not in used]
        if not free:
            kind = next(kd for kd in kinds if any((kd, c) not in used for c in colours))
            free = [c for c in colours if (kind, c) not in used]
        colour = free[int(rng.integers(len(free)))]
        used.add((kind, colour))
        sz = "small" if rng.random() < 0.5 else "large"
        r = SIZES[sz] * side
        speed = float(rng.uniform(s_lo, s_hi)) * side
        ang = float(rng.uniform(0, 2 * math.pi))
        objects.append(ObjectSpec(
            kind=kind, colour=colour, size=sz, radius=r,
            x0=float(rng.uniform(r, width - r)), y0=float(rng.uniform(r, height - r)),
            vx=speed * math.cos(ang), vy=speed * math.sin(ang),
            t_appear=float(a), t_leave=None if leave is None else float(leave)))

    # colour change: one object, new (kind, colour) pair unused by anyone
    rng = stream(3)
    if objects and rng.random() < k["p_change"]:
        cands = [i for i, o in enumerate(objects)
                 if (o.t_leave if o.t_leave is not None else d) - o.t_appear >= 2 * MIN_VISIBLE_S + 2]
        if cands:
            i = cands[int(rng.integers(len(cands)))]
            o = objects[i]
            end = o.t_leave if o.t_leave is not None else d
            new = [c for c in colours if c != o.colour and (o.kind, c) not in used]
            if new:
                o.change_colour = new[int(rng.integers(len(new)))]
                o.change_t = float(_int_between(rng, o.t_appear + MIN_VISIBLE_S,
                                                end - MIN_VISIBLE_S))
                used.add((o.kind, o.change_colour))

    nd: Needle | None = None
    rng = stream(4)
    if has_needle:
        nd = place_needle(rng, objects, d, width, height, k["needle_seconds"])

    spec = SceneSpec(seed=int(seed), duration_s=d, fps=float(fps), width=width, height=height,
                     background=background, objects=objects, events=[], needle=nd,
                     palette=check_palette(palette))
    if events:
        spec.events = _events(spec)
    return spec


def place_needle(rng: np.random.Generator, objects: list[ObjectSpec], duration_s: float, width: int,
                 height: int, seconds: tuple[int, int] = (3, 5)) -> Needle:
    """A needle star for a scene: visible `seconds` (whole, inclusive range) somewhere between 5 %
    and 95 % of the video, in a colour no object of the scene ever has, anywhere on screen."""
    d = duration_s
    dur = min(_int_between(rng, seconds[0], seconds[1]), max(1, int(d) - 1))
    start = _int_between(rng, 0.05 * d, min(0.95 * d, d) - dur)
    start = max(0, min(start, int(math.floor(d - dur))))
    taken = {c for o in objects for c in o.colours()}
    free = [c for c in COLOUR_NAMES if c not in taken] or list(COLOUR_NAMES)
    nr = NEEDLE_RADIUS * float(min(width, height))
    return Needle(colour=free[int(rng.integers(len(free)))],
                  x=float(rng.uniform(nr, width - nr)), y=float(rng.uniform(nr, height - nr)),
                  radius=nr, t_appear=float(start), t_leave=float(start + dur))


def _events(spec: SceneSpec) -> list[Event]:
    ev: list[Event] = []
    for i, o in enumerate(spec.objects):
        ev.append(Event("appear", o.t_appear, (i,)))
        if o.t_leave is not None:
            ev.append(Event("leave", o.t_leave, (i,)))
        if o.change_t is not None:
            ev.append(Event("change_colour", o.change_t, (i,),
                            info={"from": o.colour, "to": o.change_colour}))
    ev.extend(_collisions(spec))
    if spec.needle is not None:
        n = spec.needle
        ev.append(Event("needle", n.t_appear, (), n.t_leave,
                        info={"kind": n.kind, "colour": n.colour}))
    order = {"appear": 0, "change_colour": 1, "collide": 2, "needle": 3, "leave": 4}
    ev.sort(key=lambda e: (e.t, order[e.kind], e.objects))
    return ev


def _frame_range(spec: SceneSpec, t0: float, t1: float | None) -> tuple[int, int]:
    """Frame indices i with t0 <= i/fps < t1 (t1 None: to the end)."""
    n = spec.n_frames
    i0 = max(0, int(math.ceil(t0 * spec.fps - 1e-9)))
    while i0 > 0 and (i0 - 1) / spec.fps >= t0:
        i0 -= 1
    while i0 < n and i0 / spec.fps < t0:
        i0 += 1
    if t1 is None:
        return i0, n
    i1 = max(i0, min(n, int(math.ceil(t1 * spec.fps - 1e-9))))
    while i1 > i0 and (i1 - 1) / spec.fps >= t1:
        i1 -= 1
    while i1 < n and i1 / spec.fps < t1:
        i1 += 1
    return i0, i1


def _collisions(spec: SceneSpec) -> list[Event]:
    """Overlap of rendered masks on the frame grid, merged into runs of frames."""
    out: list[Event] = []
    objs = spec.objects
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            t0 = max(a.t_appear, b.t_appear)
            ends = [x for x in (a.t_leave, b.t_leave) if x is not None]
            t1 = min(ends) if ends else None
            f0, f1 = _frame_range(spec, t0, t1)
            if f1 <= f0:
                continue
            ts = np.arange(f0, f1, dtype=np.float64) / spec.fps
            ax, ay = _position(a, ts, spec.width, spec.height)
            bx, by = _position(b, ts, spec.width, spec.height)
            reach = a.radius + b.radius + 2.0
            cand = np.nonzero((ax - bx) ** 2 + (ay - by) ** 2 <= reach * reach)[0]
            run_start = prev = None
            for c in cand:
                fi = f0 + int(c)
                t = fi / spec.fps
                hit = _regions_overlap(_object_region(spec, i, t), _object_region(spec, j, t))
                if hit:
                    if run_start is None or fi != prev + 1:
                        if run_start is not None:
                            out.append(Event("collide", run_start / spec.fps, (i, j),
                                             (prev + 1) / spec.fps))
                        run_start = fi
                    prev = fi
            if run_start is not None:
                out.append(Event("collide", run_start / spec.fps, (i, j), (prev + 1) / spec.fps))
    return out


# --------------------------------------------------------------------------- rendering

def visible_objects(spec: SceneSpec, t: float) -> list[int]:
    """Indices of the (non-needle) objects on screen at t, in drawing order."""
    return [i for i, o in enumerate(spec.objects) if o.visible(t)]


def object_mask(spec: SceneSpec, i: int, t: float) -> np.ndarray:
    """(H, W) bool: the pixels object i would cover at t (ignoring occlusion and
    visibility); ``i == spec.needle_label`` is the needle."""
    if spec.needle is not None and i == spec.needle_label:
        return _full_mask(_needle_region(spec), spec.width, spec.height)
    return _full_mask(_object_region(spec, i, t), spec.width, spec.height)


def render_frame(spec: SceneSpec, t: float) -> np.ndarray:
    """The frame at time t: (H, W, 3) uint8, RGB."""
    frame = _background_image(spec.background, spec.width, spec.height).copy()
    for i in visible_objects(spec, t):
        reg = _object_region(spec, i, t)
        if reg is not None:
            y0, y1, x0, x1, m = reg
            frame[y0:y1, x0:x1][m] = spec.rgb(spec.objects[i].colour_at(t))
    if spec.needle is not None and spec.needle.visible(t):
        y0, y1, x0, x1, m = _needle_region(spec)
        frame[y0:y1, x0:x1][m] = spec.rgb(spec.needle.colour)
    return frame


def label_map(spec: SceneSpec, t: float) -> np.ndarray:
    """(H, W) int16 segmentation of the frame at t: -1 background, i for object i,
    ``spec.needle_label`` for the needle (occlusion as rendered)."""
    lab = np.full((spec.height, spec.width), -1, dtype=np.int16)
    for i in visible_objects(spec, t):
        reg = _object_region(spec, i, t)
        if reg is not None:
            y0, y1, x0, x1, m = reg
            lab[y0:y1, x0:x1][m] = i
    if spec.needle is not None and spec.needle.visible(t):
        y0, y1, x0, x1, m = _needle_region(spec)
        lab[y0:y1, x0:x1][m] = spec.needle_label
    return lab


def iter_frames(spec: SceneSpec, fps: float | None = None, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Lazily yield (t, frame) for frames i in [start, stop) at ``fps`` (default
    spec.fps; t = i / fps).  One frame at a time, so any duration streams."""
    rate = float(spec.fps if fps is None else fps)
    n = int(math.floor(spec.duration_s * rate + 1e-9))
    stop = n if stop is None else min(stop, n)
    for i in range(start, stop):
        t = i / rate
        yield t, render_frame(spec, t)


def render_frames(spec: SceneSpec, fps: float | None = None, max_frames: int = 4000) -> np.ndarray:
    """All frames as (T, H, W, 3) uint8 -- for short scenes only."""
    rate = float(spec.fps if fps is None else fps)
    n = int(math.floor(spec.duration_s * rate + 1e-9))
    if n > max_frames:
        raise ValueError(f"{n} frames > max_frames={max_frames}; use iter_frames to stream")
    out = np.empty((n, spec.height, spec.width, 3), dtype=np.uint8)
    for i, (_, f) in enumerate(iter_frames(spec, rate)):
        out[i] = f
    return out


# --------------------------------------------------------------------------- video files

def write_video(spec: SceneSpec, path: str | Path, codec: str = "libx264",
                fps: float | None = None, crf: int = 18, preset: str = "ultrafast") -> Path:
    """Stream the scene into an MP4 file (yuv420p) and return its path.

    ``fps`` (default spec.fps) is the file's frame rate; frames are rendered at
    t = i / fps, so a 1-fps spec can be written at, e.g., 4 fps.  ``libx264`` falls back
    to ``mpeg4`` (with a warning) when this PyAV build lacks it.
    """
    import av

    if spec.width % 2 or spec.height % 2:
        raise ValueError(f"yuv420p needs even sizes, got {spec.width}x{spec.height}")
    rate_f = float(spec.fps if fps is None else fps)
    rate = Fraction(rate_f).limit_denominator(1001)
    if codec not in av.codecs_available:
        fallback = "mpeg4"
        warnings.warn(f"codec {codec!r} not in this PyAV build; writing {fallback!r} instead",
                      RuntimeWarning, stacklevel=2)
        codec = fallback
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = spec.width, spec.height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1) / rate
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": preset}
        else:
            stream.bit_rate = max(200_000, spec.width * spec.height * 60)
            stream.options = {"qscale": "3"}
        for i, (_, img) in enumerate(iter_frames(spec, rate_f)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


# --------------------------------------------------------------------------- words

_T_COLOUR = "what colour is the {kind}?"
_T_SHAPE = "what shape is the {colour} object?"
_T_EXISTS = "is there {article} {colour} {kind}?"
_T_COUNT = "how many objects are there?"
_T_ORDER = "which appeared first, the {a} or the {b}?"
_T_WHEN = "when did the {colour} {kind} appear?"
_T_CHANGE = "what colour did the {colour} {kind} change to?"
_T_COLLIDE = "did the {a} and the {b} collide?"
_TEMPLATES = (_T_COLOUR, _T_SHAPE, _T_EXISTS, _T_COUNT, _T_ORDER, _T_WHEN, _T_CHANGE, _T_COLLIDE)

_SYNONYMS = {"color": "colour", "colors": "colours", "gray": "grey"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"the", "a", "an"}
_TOKEN_RE = re.compile(r"[a-z]+|\d+")


def tokenize_words(text: str, max_number: int = MAX_WHOLE_NUMBER) -> list[str]:
    """Lower-case, map synonyms, split on whitespace/punctuation (dropped); numbers
    <= max_number are one token, larger ones become one token per digit."""
    out: list[str] = []
    for tok in _TOKEN_RE.findall(text.lower()):
        if tok.isdigit():
            tok = tok.lstrip("0") or "0"
            if int(tok) <= max_number:
                out.append(tok)
            else:
                out.extend(tok)
        else:
            out.append(_SYNONYMS.get(tok, tok))
    return out


def detokenize_words(tokens: Sequence[str]) -> str:
    """Join tokens with spaces, gluing runs of digit tokens back into numbers."""
    parts: list[str] = []
    for tok in tokens:
        if tok.isdigit() and parts and parts[-1].isdigit():
            parts[-1] += tok
        else:
            parts.append(tok)
    return " ".join(parts)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def vocabulary(max_number: int = MAX_WHOLE_NUMBER) -> list[str]:
    """Every token a question, answer or choice can contain: sorted words, then the
    numbers 0..max(9, max_number) in numeric order."""
    words: set[str] = {"yes", "no", "a", "an"}
    for tpl in _TEMPLATES:
        words.update(tokenize_words(re.sub(r"\{\w+\}", " ", tpl)))
    words.update(ALL_KINDS)
    words.update(COLOUR_NAMES)
    nums = [str(i) for i in range(max(9, max_number) + 1)]
    return sorted(words) + nums


def normalize_answer(text: str) -> list[str]:
    toks = tokenize_words(text, max_number=10**9)
    toks = [_NUMBER_WORDS.get(t, t) for t in toks]
    return [t for t in toks if t not in _ARTICLES]


def _first_number(text: str) -> int | None:
    toks = normalize_answer(detokenize_words(tokenize_words(text)))
    for t in toks:
        if t.isdigit():
            return int(t)
    return None


def score(qa: QA, predicted: str) -> bool:
    """Exact match after normalisation; numeric questions within meta['tolerance_s']."""
    if qa.meta.get("numeric"):
        p = _first_number(predicted)
        return p is not None and abs(p - int(qa.answer)) <= float(qa.meta.get("tolerance_s", 0))
    return normalize_answer(predicted) == normalize_answer(qa.answer)


# --------------------------------------------------------------------------- questions

def _default_rng(spec: SceneSpec) -> np.random.Generator:
    return np.random.default_rng([spec.seed, 0x0A5C])


def questions(spec: SceneSpec, rng: np.random.Generator | None = None,
              families: Sequence[str] | None = None, per_family: int = 1,
              when_tolerance_s: float = WHEN_TOLERANCE_S,
              polarity: dict[str, bool] | None = None) -> list[QA]:
    """Ground-truth questions about ``spec``: up to ``per_family`` per family (in
    `FAMILIES` order; families not applicable to the video are skipped).

    ``polarity`` fixes what a fair coin otherwise draws, so that an evaluation can balance its
    answers exactly: ``{"exists": True}`` asks about a present pair ("yes"), ``{"collide": False}``
    about a pair that never collides ("no"), ``{"order": True}`` names the earlier object first.
    The coin is still drawn, so the other questions are the same either way."""
    polarity = polarity or {}
    rng = _default_rng(spec) if rng is None else rng
    fams = FAMILIES if families is None else tuple(families)
    bad = set(fams) - set(FAMILIES)
    if bad:
        raise ValueError(f"unknown families {sorted(bad)}")
    objs = spec.objects
    base_meta = {"seed": spec.seed, "duration_s": spec.duration_s}
    out: list[QA] = []

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def qa(family, question, answer, choices=None, **meta):
        if all(q.question != question for q in out):   # no repeats with per_family > 1
            out.append(QA(family, question, answer, choices, {**base_meta, **meta}))

    held = {(o.kind, c) for o in objs for c in o.colours()}
    colour_users: dict[str, int] = {}
    for o in objs:
        for c in set(o.colours()):
            colour_users[c] = colour_users.get(c, 0) + 1
    if spec.needle is not None:
        colour_users[spec.needle.colour] = colour_users.get(spec.needle.colour, 0) + 1

    for fam in fams:
        for _ in range(per_family):
            if fam == "colour":
                kinds = [kd for kd in KINDS if sum(o.kind == kd for o in objs) == 1]
                cands = [i for i, o in enumerate(objs) if o.kind in kinds and o.change_t is None]
                if not cands:
                    break
                i = pick(cands)
                qa(fam, _T_COLOUR.format(kind=objs[i].kind), objs[i].colour,
                   list(COLOUR_NAMES), objects=[i])
            elif fam == "shape":
                cands = [(i, c) for i, o in enumerate(objs) for c in o.colours()
                         if colour_users.get(c) == 1]
                if not cands:
                    break
                i, c = pick(cands)
                qa(fam, _T_SHAPE.format(colour=c), objs[i].kind, list(KINDS), objects=[i])
            elif fam == "exists":
                want_yes = bool(rng.random() < 0.5)
                want_yes = polarity.get(fam, want_yes)
                if want_yes:
                    kd, c = pick(sorted(held))
                else:
                    absent = [(kd, c) for kd in KINDS for c in COLOUR_NAMES if (kd, c) not in held]
                    kd, c = pick(absent)
                qa(fam, _T_EXISTS.format(article=_article(c), colour=c, kind=kd),
                   "yes" if want_yes else "no", ["yes", "no"], kind=kd, colour=c)
            elif fam == "count":
                n = spec.n_distinct()
                qa(fam, _T_COUNT, str(n), [str(k) for k in range(1, MAX_OBJECTS + 1)], count=n)
                break
            elif fam == "order":
                pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs))
                         if i != j and abs(objs[i].t_appear - objs[j].t_appear) >= ORDER_MIN_GAP_S]
                if not pairs:
                    break
                i, j = pick(pairs)       # listed as (i, j): i first in the sentence
                if fam in polarity and (objs[i].t_appear < objs[j].t_appear) != polarity[fam]:
                    i, j = j, i
                first = i if objs[i].t_appear < objs[j].t_appear else j
                qa(fam, _T_ORDER.format(a=objs[i].name, b=objs[j].name), objs[first].name,
                   [objs[i].name, objs[j].name], objects=[i, j])
            elif fam == "when":
                if not objs:
                    break
                i = pick(range(len(objs)))
                o = objs[i]
                qa(fam, _T_WHEN.format(colour=o.colour, kind=o.kind),
                   str(int(math.floor(o.t_appear))), None, objects=[i], numeric=True,
                   tolerance_s=when_tolerance_s, t=o.t_appear)
            elif fam == "needle":
                n = spec.needle
                if n is None:
                    c = pick(COLOUR_NAMES)
                    qa(fam, _T_EXISTS.format(article=_article(c), colour=c, kind=NEEDLE_KIND),
                       "no", ["yes", "no"], form="exists", needle=False)
                    break
                qa(fam, _T_EXISTS.format(article=_article(n.colour), colour=n.colour,
                                         kind=n.kind), "yes", ["yes", "no"], form="exists",
                   needle=True, t=n.t_appear, t_end=n.t_leave)
                qa(fam, _T_WHEN.format(colour=n.colour, kind=n.kind),
                   str(int(math.floor(n.t_appear))), None, form="when", needle=True,
                   numeric=True, tolerance_s=when_tolerance_s, t=n.t_appear, t_end=n.t_leave)
                break
            elif fam == "change":
                cands = [i for i, o in enumerate(objs) if o.change_t is not None]
                if not cands:
                    break
                i = pick(cands)
                o = objs[i]
                qa(fam, _T_CHANGE.format(colour=o.colour, kind=o.kind), o.change_colour,
                   list(COLOUR_NAMES), objects=[i], t=o.change_t)
            elif fam == "collide":
                hit = sorted({e.objects for e in spec.events if e.kind == "collide"})
                want_yes = bool(rng.random() < 0.5)
                want_yes = polarity.get(fam, want_yes)
                if want_yes:
                    cands = hit
                else:
                    cands = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                             if (i, j) not in hit and _co_visible(spec, i, j)]
                if not cands:
                    continue
                i, j = pick(cands)
                if rng.random() < 0.5:
                    i, j = j, i
                qa(fam, _T_COLLIDE.format(a=objs[i].name, b=objs[j].name),
                   "yes" if want_yes else "no", ["yes", "no"], objects=[i, j])
    return out


def _co_visible(spec: SceneSpec, i: int, j: int) -> bool:
    a, b = spec.objects[i], spec.objects[j]
    t0 = max(a.t_appear, b.t_appear)
    ends = [x for x in (a.t_leave, b.t_leave) if x is not None]
    f0, f1 = _frame_range(spec, t0, min(ends) if ends else None)
    return f1 > f0


# --------------------------------------------------------------------------- CLI

def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m stream.synthetic",
                                 description="Write a synthetic video and print its questions (JSON lines).")
    ap.add_argument("--seed", type=int, default=0, help="the scene's seed, >= 0 (default 0)")
    ap.add_argument("--duration", type=float, default=60.0,
                    help=f"seconds, at least {MIN_VISIBLE_S} (default 60)")
    ap.add_argument("--fps", type=float, default=1.0, help="frames per second of the scene (default 1)")
    ap.add_argument("--size", type=int, default=64, help="width and height in pixels, even, >= 16 (default 64)")
    ap.add_argument("--needle", choices=["yes", "no", "random"], default="random",
                    help="a 3-5 s star somewhere in the video (default: drawn)")
    ap.add_argument("--out", type=Path, help="write the video here (MP4); without it only the questions")
    ap.add_argument("--codec", default="libx264", help="the video codec (default libx264)")
    a = ap.parse_args(argv)
    problems = []
    if a.seed < 0:
        problems.append(f"--seed >= 0, got {a.seed}")
    if not (math.isfinite(a.duration) and a.duration >= MIN_VISIBLE_S):
        problems.append(f"--duration of at least {MIN_VISIBLE_S} s, got {a.duration:g}")
    if not (math.isfinite(a.fps) and 0 < a.fps <= 120):
        problems.append(f"--fps in (0, 120], got {a.fps:g}")
    if a.size < 16 or a.size % 2:
        problems.append(f"--size even and >= 16 (H.264's yuv420p), got {a.size}")
    if a.out is not None and a.codec != "libx264":
        import av
        if a.codec not in av.codecs_available:
            problems.append(f"--codec one this PyAV build writes (e.g. libx264, mpeg4), got {a.codec!r}")
    if problems:
        ap.error("expected " + "; ".join(problems))
    nd = {"yes": True, "no": False, "random": None}[a.needle]
    spec = make_scene(a.seed, a.duration, a.fps, (a.size, a.size), needle=nd)
    try:
        if a.out:
            t0 = time.perf_counter()
            write_video(spec, a.out, codec=a.codec)
            print(json.dumps({"wrote": str(a.out), "frames": spec.n_frames,
                              "seconds": round(time.perf_counter() - t0, 3)}))
        for q in questions(spec):
            print(json.dumps(dataclasses.asdict(q)))
        sys.stdout.flush()          # here, not at exit, where a closed pipe is an "Exception ignored" message
    except BrokenPipeError:
        # the reader went away (`... | head -1`): it has what it wanted, so end quietly. Output still
        # buffered goes to /dev/null, else the interpreter's own flush at exit would fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
