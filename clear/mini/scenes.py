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


SCORE_MAX_SIZE = 128  # images are scored at most this many pixels wide (box-downsampled): the same test at any size
REGION = 1.5  # a shape's region: its slot's box scaled by this (split between slots by nearest centre)
_FIT_SHIFTS = np.linspace(-JITTER, JITTER, 5)  # outline fits over the jitter a scene may have
_FIT_SCALES = 1 + np.linspace(-SIZE_JITTER, SIZE_JITTER, 5)


def _inside(kind: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Whether points at offset (dx, dy) from a shape's centre lie within its outline (fractions of the side)."""
    h = size / 2
    if kind == "circle":
        return dx * dx + dy * dy <= h * h
    if kind == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if kind == "triangle":  # apex (0, -h), base y = +h, as :func:`_polygon`
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(kind)


def _best_iou(mask: np.ndarray, region: np.ndarray, xx: np.ndarray, yy: np.ndarray, kind: str,
              cx: float, cy: float, size: float) -> float:
    """The largest IoU, within ``region``, of ``mask`` and the ``kind`` outline at the slot, over the slot's
    jitter (centre +-JITTER, size +-SIZE_JITTER)."""
    m = mask[region]
    x, y = xx[region], yy[region]
    best = 0.0
    for sx in _FIT_SHIFTS:
        for sy in _FIT_SHIFTS:
            for k in _FIT_SCALES:
                t = _inside(kind, x - (cx + sx), y - (cy + sy), size * k)
                union = np.count_nonzero(m | t)
                if union:
                    best = max(best, np.count_nonzero(m & t) / union)
    return best


def score_parts(image: Image.Image, scene: Scene) -> dict:
    """The parts of :func:`score`, each in [0, 1], from what the caption states (each shape's slot, kind and
    colour; not the scene's jittered positions), every pixel read as its nearest palette colour:

    * ``per_shape``: for each named shape, the IoU within its region (its slot's box x ``REGION``, split
      between slots by nearest centre) of the pixels of the named colour and the named kind's outline in its
      slot (best fit over the slot's jitter), times (that IoU / the best IoU of any kind's outline)^2, so that
      another kind scores low (measured: a circle where a square is named 0.59, a triangle 0.18). A missing
      shape scores 0.
    * ``shapes``: the mean of ``per_shape`` (the score).
    * ``background``: the fraction of pixels away from every slot that have the background colour.
    """
    if image.width > SCORE_MAX_SIZE:
        image = image.convert("RGB").resize((SCORE_MAX_SIZE, SCORE_MAX_SIZE), Image.BOX)
    labels = _labels(image)
    n = labels.shape[0]
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    slots = [_slot(scene, i) for i in range(len(scene.shapes))]
    centre_d = np.stack([np.maximum(abs(xx - cx), abs(yy - cy)) / s for cx, cy, s in slots]) if slots else None
    keep = np.ones_like(labels, dtype=bool)
    per_shape = []
    for i, sh in enumerate(scene.shapes):
        cx, cy, s = slots[i]
        region = (centre_d[i] <= REGION / 2) & (centre_d[i] <= centre_d.min(0))
        mask = labels == _PALETTE_NAMES.index(sh.color)
        fits = {k: _best_iou(mask, region, xx, yy, k, cx, cy, s) for k in KINDS}
        right, best = fits[sh.kind], max(fits.values())
        per_shape.append(right * (right / best) ** 2 if best > 0 else 0.0)
        keep &= np.maximum(abs(xx - cx), abs(yy - cy)) > 0.5 * s * (1 + SIZE_JITTER) + JITTER + 1.5 / n
    bg = _PALETTE_NAMES.index(scene.background)
    background = float((labels[keep] == bg).mean()) if keep.any() else 1.0
    return {"shapes": float(np.mean(per_shape)) if per_shape else 1.0, "background": background,
            "per_shape": [float(v) for v in per_shape]}


def score(image: Image.Image, scene: Scene) -> float:
    """Prompt following of ``image`` for ``scene``'s caption, in [0, 1]: the mean over the named shapes of how
    well the named colour covers each shape's outline in the slot the caption puts it in (an IoU, see
    :func:`score_parts`). An image without the shapes scores 0 whatever its background; the background's
    colour is reported separately (``score_parts(...)["background"]``)."""
    return score_parts(image, scene)["shapes"]


def recoloured(scene: Scene) -> Scene:
    """``scene`` with every shape in another colour (nor the background's): a control of the score."""
    names = [c for c in _PALETTE_NAMES if c != scene.background]
    return Scene(scene.background, tuple(Shape(sh.kind, names[(names.index(sh.color) + 3) % len(names)],
                                               sh.x, sh.y, sh.size) for sh in scene.shapes),
                 scene.layout, scene.place, scene.relation)


_MOVED_PLACE = {"in the center": "on the left", "on the left": "on the right", "on the right": "on the left",
                "at the top": "at the bottom", "at the bottom": "at the top"}


def moved(scene: Scene) -> Scene:
    """``scene`` with its shapes in other places than its caption names (one shape: another place; two
    related shapes: swapped; a row: moved up by a quarter of the side): a control of the score."""
    if scene.layout == "one":
        sh = scene.shapes[0]
        dx, dy = (np.array(PLACES[_MOVED_PLACE[scene.place]]) - PLACES[scene.place])
        return Scene(scene.background, (Shape(sh.kind, sh.color, sh.x + dx, sh.y + dy, sh.size),), "one",
                     place=scene.place)
    if scene.layout == "relation":
        a, b = scene.shapes
        return Scene(scene.background, (Shape(a.kind, a.color, b.x, b.y, a.size),
                                        Shape(b.kind, b.color, a.x, a.y, b.size)), "relation", relation=scene.relation)
    return Scene(scene.background, tuple(Shape(sh.kind, sh.color, sh.x, sh.y - 0.25, sh.size) for sh in scene.shapes),
                 scene.layout)


def blank(scene: Scene) -> Scene:
    """``scene``'s background without any shape: a control of the score."""
    return Scene(scene.background, (), scene.layout, scene.place, scene.relation)


def controls(n: int = 200, seed: int = 0, size: int = 64) -> dict:
    """Mean :func:`score` of control images against ``n`` held-out scenes' captions: the rendered scene, its
    blank background, the image of the next held-out scene (``chance``), the scene with its shapes recoloured,
    and with them moved. Returned with ``rendered_min`` (the lowest score of a rendered scene)."""
    scenes = held_out_scenes(n + 1, seed)
    rows = {"rendered": [], "blank": [], "chance": [], "recoloured": [], "moved": []}
    for i in range(n):
        s = scenes[i]
        rows["rendered"].append(score(render(s, size), s))
        rows["blank"].append(score(render(blank(s), size), s))
        rows["chance"].append(score(render(scenes[i + 1], size), s))
        rows["recoloured"].append(score(render(recoloured(s), size), s))
        rows["moved"].append(score(render(moved(s), size), s))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out.update(rendered_min=float(np.min(rows["rendered"])), n=n, size=size)
    return out


def chance_score(n: int = 256, seed: int = 0, size: int = 64) -> float:
    """Mean score of the image rendered for held-out scene ``i + 1`` against scene ``i``'s caption: what an
    image that follows no (or another) prompt achieves."""
    scenes = held_out_scenes(n + 1, seed)
    return float(np.mean([score(render(scenes[i + 1], size), scenes[i]) for i in range(n)]))
