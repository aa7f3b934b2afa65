"""Procedural scenes for the mini teacher: a background colour and one to three large shapes whose
colours, kinds, count and places a caption states. Everything is a function of the scene's parameters:
its caption, its image at any size, and a prompt-following score of any image against it.

Layout is set by the caption (a named place or relation puts each shape in a fixed slot) with a small
per-scene jitter of position and size; shapes are 18-29 px across at 64 px, wider than the r = 4 token
(16 px) window of a CLEAR student at that size, so drawing them needs attention beyond the window.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30), "purple": (140, 50, 180),
}
KINDS = ("circle", "square", "triangle")
PLACES = {"in the center": (0.5, 0.5), "on the left": (0.27, 0.5), "on the right": (0.73, 0.5),
          "at the top": (0.5, 0.27), "at the bottom": (0.5, 0.73)}
RELATIONS = {"left of": ((0.27, 0.5), (0.73, 0.5)), "above": ((0.5, 0.27), (0.5, 0.73))}
COUNT_WORDS = {2: "two", 3: "three"}
# nominal shape size (fraction of the side) by layout
SIZE_ONE, SIZE_TWO, SIZE_THREE = 0.45, 0.38, 0.28
ROW_OF_THREE = ((0.2, 0.5), (0.5, 0.5), (0.8, 0.5))
JITTER = 0.02  # centre jitter, fraction of the side
SIZE_JITTER = 0.06  # relative size jitter

# Seeds: training scenes come from seeds [0, HELD_OUT_SEED0); held-out scenes from [HELD_OUT_SEED0, ...).
HELD_OUT_SEED0 = 1_000_000_000


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: float  # centre, fraction of the side
    y: float
    size: float  # bounding-box side, fraction of the side


@dataclass(frozen=True)
class Scene:
    """``layout``: "one" (``place``), "relation" (``relation``: shapes[0] <relation> shapes[1]),
    "count" (two or three equal shapes in a row)."""

    background: str
    shapes: tuple[Shape, ...]
    layout: str
    place: str = ""
    relation: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(**{**d, "shapes": tuple(Shape(**s) for s in d["shapes"])})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def _jitter(rng: random.Random, x: float, y: float, size: float) -> tuple[float, float, float]:
    return (x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER),
            size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)))


def sample_scene(rng: random.Random) -> Scene:
    """One scene: layout one (40%), relation (40%) or count (20%); shape colours differ from the background."""
    bg = rng.choice(sorted(COLORS))
    others = [c for c in sorted(COLORS) if c != bg]
    u = rng.random()
    if u < 0.4:
        place = rng.choice(list(PLACES))
        x, y, s = _jitter(rng, *PLACES[place], SIZE_ONE)
        return Scene(bg, (Shape(rng.choice(KINDS), rng.choice(others), x, y, s),), "one", place=place)
    if u < 0.8:
        rel = rng.choice(list(RELATIONS))
        shapes = []
        for (cx, cy) in RELATIONS[rel]:
            x, y, s = _jitter(rng, cx, cy, SIZE_TWO)
            shapes.append(Shape(rng.choice(KINDS), rng.choice(others), x, y, s))
        if (shapes[0].kind, shapes[0].color) == (shapes[1].kind, shapes[1].color):  # that is a count scene
            shapes[1] = Shape(shapes[1].kind, rng.choice([c for c in others if c != shapes[0].color]),
                              shapes[1].x, shapes[1].y, shapes[1].size)
        return Scene(bg, tuple(shapes), "relation", relation=rel)
    n = rng.choice((2, 3))
    kind, color = rng.choice(KINDS), rng.choice(others)
    slots = RELATIONS["left of"] if n == 2 else ROW_OF_THREE
    size = SIZE_TWO if n == 2 else SIZE_THREE
    return Scene(bg, tuple(Shape(kind, color, *_jitter(rng, cx, cy, size)) for cx, cy in slots), "count")


def scene_for_seed(seed: int) -> Scene:
    return sample_scene(random.Random(seed))


def held_out_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes from seeds disjoint from training (``HELD_OUT_SEED0 + seed * 10**6 + i``)."""
    return [scene_for_seed(HELD_OUT_SEED0 + seed * 1_000_000 + i) for i in range(n)]


def _a(shape: Shape) -> str:
    return f"{'an' if shape.color[0] in 'aeiou' else 'a'} {shape.color} {shape.kind}"


def caption(scene: Scene) -> str:
    on = f"on a {scene.background} background"
    if scene.layout == "one":
        return f"{_a(scene.shapes[0])} {scene.place} {on}"
    if scene.layout == "relation":
        return f"{_a(scene.shapes[0])} {scene.relation} {_a(scene.shapes[1])} {on}"
    s = scene.shapes[0]
    return f"{COUNT_WORDS[len(scene.shapes)]} {s.color} {s.kind}s {on}"


def _polygon(kind: str, x: float, y: float, size: float):
    h = size / 2
    if kind == "square":
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if kind == "triangle":  # pointing up
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    raise ValueError(kind)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB ``size`` x ``size`` image (drawn at 4x and downsampled: anti-aliased edges)."""
    ss = 4
    big = size * ss
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    for sh in scene.shapes:
        x, y, s = sh.x * big, sh.y * big, sh.size * big
        if sh.kind == "circle":
            draw.ellipse([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=COLORS[sh.color])
        else:
            draw.polygon(_polygon(sh.kind, x, y, s), fill=COLORS[sh.color])
    return img.resize((size, size), Image.BOX)


# ------------------------------------------------------------------------------------------
# Prompt-following score
# ------------------------------------------------------------------------------------------

_PALETTE_NAMES = sorted(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def _labels(image: Image.Image) -> np.ndarray:
    """Nearest palette colour index of every pixel."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    d = ((a[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def _slot(scene: Scene, i: int) -> tuple[float, float, float]:
    """The nominal (un-jittered) centre and size of shape ``i``: what the caption alone says."""
    if scene.layout == "one":
        return (*PLACES[scene.place], SIZE_ONE)
    if scene.layout == "relation":
        return (*RELATIONS[scene.relation][i], SIZE_TWO)
    if len(scene.shapes) == 2:
        return (*RELATIONS["left of"][i], SIZE_TWO)
    return (*ROW_OF_THREE[i], SIZE_THREE)


# Probe points of a shape's bounding box (relative to centre, in units of size) that tell the kinds
# apart: inside every kind, near the top corners (square only), near the bottom corners (square, triangle).
_CORE = ((0.0, 0.1),)
_TOP_CORNERS = ((-0.4, -0.4), (0.4, -0.4))
_BOTTOM_CORNERS = ((-0.34, 0.42), (0.34, 0.42))
_SIDES = ((-0.38, 0.0), (0.38, 0.0))  # circle, square: in; triangle: out


def _patch_fraction(labels: np.ndarray, cx: float, cy: float, r: float, color: int) -> float:
    n = labels.shape[0]
    x0, x1 = int(max(0, np.floor((cx - r) * n))), int(min(n, np.ceil((cx + r) * n)))
    y0, y1 = int(max(0, np.floor((cy - r) * n))), int(min(n, np.ceil((cy + r) * n)))
    patch = labels[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    return float((patch == color).mean())


def score_parts(image: Image.Image, scene: Scene) -> dict:
    """The parts of :func:`score`, each in [0, 1]: ``color`` (each shape's colour at the centre of the slot the
    caption puts it in), ``kind`` (probe points inside / outside each shape's outline, per its kind) and
    ``background`` (pixels away from every slot have the background colour)."""
    labels = _labels(image)
    n = labels.shape[0]
    bg = _PALETTE_NAMES.index(scene.background)
    color_parts, kind_parts = [], []
    keep = np.ones_like(labels, dtype=bool)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    for i, sh in enumerate(scene.shapes):
        cx, cy, s = _slot(scene, i)
        c = _PALETTE_NAMES.index(sh.color)
        color_parts.append(_patch_fraction(labels, cx, cy + 0.1 * s, 0.12 * s, c))
        inside = {"circle": _SIDES, "square": _SIDES + _TOP_CORNERS + _BOTTOM_CORNERS,
                  "triangle": _BOTTOM_CORNERS}[sh.kind]
        outside = {"circle": _TOP_CORNERS + _BOTTOM_CORNERS, "square": (), "triangle": _TOP_CORNERS + _SIDES}[sh.kind]
        probes = [_patch_fraction(labels, cx + dx * s, cy + dy * s, 0.04 * s, c) for dx, dy in inside]
        probes += [1 - _patch_fraction(labels, cx + dx * s, cy + dy * s, 0.04 * s, c) for dx, dy in outside]
        kind_parts.append(float(np.mean(probes)))
        keep &= np.maximum(abs(xx - cx), abs(yy - cy)) > 0.5 * s * (1 + SIZE_JITTER) + JITTER + 1.5 / n
    background = float((labels[keep] == bg).mean()) if keep.any() else 1.0
    return {"color": float(np.mean(color_parts)), "kind": float(np.mean(kind_parts)), "background": background}


def score(image: Image.Image, scene: Scene) -> float:
    """Prompt following of ``image`` for ``scene``'s caption, in [0, 1]: the mean of :func:`score_parts`
    (named colours where the caption puts them, shape kinds and counts by slot, background colour).
    Uses only what the caption states (slots, not the scene's jittered positions)."""
    p = score_parts(image, scene)
    return float((p["color"] + p["kind"] + p["background"]) / 3)


def chance_score(n: int = 256, seed: int = 0, size: int = 64) -> float:
    """Mean score of the image rendered for held-out scene ``i + 1`` against scene ``i``'s caption: what an
    image that follows no (or another) prompt achieves."""
    scenes = held_out_scenes(n + 1, seed)
    return float(np.mean([score(render(scenes[i + 1], size), scenes[i]) for i in range(n)]))
