"""Procedural scenes for the mini teacher: a background colour and one to three large shapes whose
colours, kinds, count and places a caption states. Everything is a function of the scene's parameters:
its caption, its image at any size and in any of :data:`STYLES` (the teacher's filled shapes, or outlines
only: the new style a LoRA of the teacher learns, :mod:`clear.mini.lora`), and a score of any image against
it (kind accuracy, placement, background) with the controls that show what the score measures.

Layout is set by the caption (a named place or relation puts each shape in a fixed slot) with a small
per-scene jitter of position and size; shapes are 18-29 px across at 64 px, wider than the r = 4 token
(16 px) window of a CLEAR student at that size, so drawing them needs attention beyond the window.
"""

from __future__ import annotations

import dataclasses
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

# Rendering styles: "flat" (filled shapes: the teacher's training data) and "outline" (each shape drawn as
# its outline only, OUTLINE_WIDTH wide, the background inside: the style of clear.mini.lora's LoRA)
STYLES = ("flat", "outline")
OUTLINE_WIDTH = 1 / 16  # stroke width of the "outline" style, fraction of the side (4 px = one token at 64 px)

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


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style={style!r}: choose one of {', '.join(STYLES)}")


def _inset(kind: str, x: float, y: float, size: float, width: float):
    """The ``kind`` outline (centre ``x``, ``y``, side ``size``) with every edge moved ``width`` inwards: a
    circle of radius ``size / 2 - width``, or the polygon scaled about its incentre (``None`` when nothing is
    left inside)."""
    if kind == "circle":
        r = size / 2 - width
        return [x - r, y - r, x + r, y + r] if r > 0 else None
    pts = np.array(_polygon(kind, x, y, size))
    edges = np.linalg.norm(np.roll(pts, -1, axis=0) - np.roll(pts, 1, axis=0), axis=1)  # side opposite each vertex
    if kind == "square":
        centre, inradius = np.array([x, y]), size / 2
    else:  # triangle: incentre = side-weighted mean of the vertices, inradius = area / semi-perimeter
        centre = (edges[:, None] * pts).sum(0) / edges.sum()
        area = 0.5 * abs(np.cross(pts[1] - pts[0], pts[2] - pts[0]))
        inradius = area / (edges.sum() / 2)
    if inradius <= width:
        return None
    return [tuple(p) for p in centre + (pts - centre) * (inradius - width) / inradius]


def render(scene: Scene, size: int = 64, style: str = "flat") -> Image.Image:
    """The scene as an RGB ``size`` x ``size`` image (drawn at 4x and downsampled: anti-aliased edges).
    ``style`` (:data:`STYLES`): ``"flat"`` fills each shape with its colour; ``"outline"`` draws its outline
    only, ``OUTLINE_WIDTH`` of the side wide, with the background colour inside."""
    _check_style(style)
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
        if style == "outline":
            inner = _inset(sh.kind, x, y, s, OUTLINE_WIDTH * big)
            if inner is not None:
                (draw.ellipse if sh.kind == "circle" else draw.polygon)(inner, fill=COLORS[scene.background])
    return img.resize((size, size), Image.BOX)


# ------------------------------------------------------------------------------------------
# The score: kind accuracy, placement, background
# ------------------------------------------------------------------------------------------

_PALETTE_NAMES = sorted(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)

SCORE_MAX_SIZE = 64  # images are scored at most this many pixels wide (box-downsampled): the same test at any size
REGION = 2.0  # a shape's region: its slot's box scaled by this (split between slots by nearest centre)
KIND_IOU = 0.5  # the named kind's outline must fit at least this well (IoU) to count as drawn
FIT_SHIFTS = np.linspace(-0.04, 0.04, 5)  # outline fits: centre offsets from the slot (fraction of the side) ...
FIT_SCALES = np.linspace(0.85, 1.15, 7)  # ... and sizes relative to the slot's (twice a scene's own jitter)


def _labels(image: Image.Image) -> np.ndarray:
    """``[n, n]``: the nearest palette colour index of every pixel."""
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


def _inside(kind: str, dx: np.ndarray, dy: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Whether points at offset (``dx``, ``dy``) from a shape's centre lie within its outline of half-size
    ``h`` (fractions of the side; broadcast together)."""
    if kind == "circle":
        return dx * dx + dy * dy <= h * h
    if kind == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if kind == "triangle":  # apex (0, -h), base y = +h, as :func:`_polygon`
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(kind)


def outline_fits(mask: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float, size: float) -> dict:
    """``{kind: IoU}``: for each kind, the largest IoU of the pixels ``mask`` (``[N]`` bool, at points ``x``,
    ``y``: ``[N]``, fractions of the side) with that kind's outline, over centres ``(cx, cy) + FIT_SHIFTS``
    and sizes ``size * FIT_SCALES``. Vectorised: ``[shifts, shifts, scales, N]`` tests per kind."""
    count = int(mask.sum())
    dx = (x[None, :] - cx - FIT_SHIFTS[:, None])[:, None, None, :]  # [A, 1, 1, N]
    dy = (y[None, :] - cy - FIT_SHIFTS[:, None])[None, :, None, :]  # [1, A, 1, N]
    h = (size * FIT_SCALES / 2)[None, None, :, None]  # [1, 1, C, 1]
    out = {}
    for kind in KINDS:
        t = _inside(kind, dx, dy, h)
        inter = (t & mask).sum(-1)
        union = t.sum(-1) + count - inter
        out[kind] = float((inter / np.maximum(union, 1)).max())
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (``[n, n]`` bool) with every region it encloses (not connected to the border through
    unmasked pixels, 4-neighbours) filled in."""
    padded = Image.fromarray(np.pad(mask, 1).astype(np.uint8) * 255).copy()  # a copy: its own, writable pixels
    ImageDraw.floodfill(padded, (0, 0), 128)  # the outside: every unmasked pixel reachable from the border
    return (np.asarray(padded) != 128)[1:-1, 1:-1]


def score_parts(image: Image.Image, scene: Scene, style: str = "flat") -> dict:
    """What ``image`` shows of ``scene``'s caption, from what the caption states (each shape's slot, kind and
    colour; not the scene's jittered positions), every pixel read as its nearest palette colour. For each
    named shape, within its region (its slot's box x ``REGION``, split between slots by nearest centre),
    the pixels of the named colour are fitted by a circle, a square and a triangle (:func:`outline_fits`):

    * ``kind_accuracy``: the fraction of the named shapes whose named kind fits best and fits well
      (IoU >= ``KIND_IOU``). A shape of another kind, a blob or a missing shape counts 0; a flood of the
      named colour fits no outline well; an image that draws one kind everywhere gets the shapes of that
      kind right and no other (chance: about 1/3).
    * ``placement``: the mean over the named shapes of the best IoU of any kind's outline: the named
      colour in the named place in some compact shape, whatever its kind.
    * ``background``: the fraction of pixels away from every slot that have the background colour.
    * ``shapes``: per named shape ``{"kind", "best_kind", "fits": {kind: IoU}, "right"}``.

    A scene without shapes (no caption names one) has ``kind_accuracy`` and ``placement`` ``None``.

    ``style="outline"`` scores images of that style (:func:`render`): the pixels of the named colour are
    taken with the holes they enclose filled (an outline counts as its shape; a filled shape, which
    encloses nothing, is scored as in ``"flat"``)."""
    _check_style(style)
    if image.width > SCORE_MAX_SIZE:
        image = image.convert("RGB").resize((SCORE_MAX_SIZE, SCORE_MAX_SIZE), Image.BOX)
    labels = _labels(image)
    n = labels.shape[0]
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    slots = [_slot(scene, i) for i in range(len(scene.shapes))]
    centre_d = np.stack([np.maximum(abs(xx - cx), abs(yy - cy)) / s for cx, cy, s in slots]) if slots else None
    keep = np.ones_like(labels, dtype=bool)
    shapes = []
    for i, sh in enumerate(scene.shapes):
        cx, cy, s = slots[i]
        region = (centre_d[i] <= REGION / 2) & (centre_d[i] <= centre_d.min(0))
        named = labels == _PALETTE_NAMES.index(sh.color)
        mask = (_fill_holes(named) if style == "outline" else named)[region]
        fits = outline_fits(mask, xx[region], yy[region], cx, cy, s)
        best = max(KINDS, key=lambda k: fits[k])
        right = best == sh.kind and fits[sh.kind] >= KIND_IOU and all(
            fits[k] < fits[sh.kind] for k in KINDS if k != sh.kind)
        shapes.append({"kind": sh.kind, "best_kind": best, "fits": fits, "right": bool(right)})
        keep &= np.maximum(abs(xx - cx), abs(yy - cy)) > 0.5 * s * (1 + SIZE_JITTER) + JITTER + 1.5 / n
    bg = _PALETTE_NAMES.index(scene.background)
    background = float((labels[keep] == bg).mean()) if keep.any() else 1.0
    return {"kind_accuracy": float(np.mean([p["right"] for p in shapes])) if shapes else None,
            "placement": float(np.mean([max(p["fits"].values()) for p in shapes])) if shapes else None,
            "background": background, "shapes": shapes}


def score(image: Image.Image, scene: Scene, style: str = "flat") -> float | None:
    """Kind accuracy of ``image`` for ``scene``'s caption, in [0, 1] (``None`` when it names no shape): the
    fraction of the named shapes drawn as the named kind, in the named colour, in the named place (see
    :func:`score_parts`, which also gives placement and background). The rendered scene scores 1 (controls:
    >= 0.95 over held-out scenes); its blank background 0; the image flooded with a named colour at most
    0.15; shapes of one kind drawn at every named place whatever the caption's kinds about 1/3 (chance);
    every shape as another kind about 0. ``style``: the style the image is drawn in (:func:`score_parts`)."""
    return score_parts(image, scene, style)["kind_accuracy"]


def score_images(images, scenes, style: str = "flat") -> dict:
    """The score of images against their scenes (two equal-length sequences), pooled over named shapes:
    ``{"kind_accuracy", "placement", "background", "shapes", "images", "per_image"}`` (``background``:
    mean over images; ``per_image``: each image's :func:`score_parts` without its per-shape detail);
    ``style``: the style the images are drawn in (:func:`score_parts`)."""
    parts = [score_parts(im, sc, style) for im, sc in zip(images, scenes, strict=True)]
    shapes = [p for part in parts for p in part["shapes"]]
    return {"kind_accuracy": float(np.mean([p["right"] for p in shapes])) if shapes else None,
            "placement": float(np.mean([max(p["fits"].values()) for p in shapes])) if shapes else None,
            "background": float(np.mean([p["background"] for p in parts])) if parts else None,
            "shapes": len(shapes), "images": len(parts),
            "per_image": [{k: v for k, v in p.items() if k != "shapes"} for p in parts]}


# ------------------------------------------------------------------------------------------
# Controls of the score: images a model could make, what each must score
# ------------------------------------------------------------------------------------------

def recoloured(scene: Scene) -> Scene:
    """``scene`` with every shape in another colour (nor the background's)."""
    names = [c for c in _PALETTE_NAMES if c != scene.background]
    return dataclasses.replace(scene, shapes=tuple(
        dataclasses.replace(sh, color=names[(names.index(sh.color) + 3) % len(names)]) for sh in scene.shapes))


_MOVED_PLACE = {"in the center": "on the left", "on the left": "on the right", "on the right": "on the left",
                "at the top": "at the bottom", "at the bottom": "at the top"}


def moved(scene: Scene) -> Scene:
    """``scene`` with its shapes in other places than its caption names (one shape: another place; two
    related shapes: swapped; a row: moved up by a quarter of the side)."""
    if scene.layout == "one":
        sh = scene.shapes[0]
        dx, dy = (np.array(PLACES[_MOVED_PLACE[scene.place]]) - PLACES[scene.place])
        return dataclasses.replace(scene, shapes=(dataclasses.replace(sh, x=sh.x + dx, y=sh.y + dy),))
    if scene.layout == "relation":
        a, b = scene.shapes
        return dataclasses.replace(scene, shapes=(dataclasses.replace(a, x=b.x, y=b.y),
                                                  dataclasses.replace(b, x=a.x, y=a.y)))
    return dataclasses.replace(scene, shapes=tuple(dataclasses.replace(sh, y=sh.y - 0.25) for sh in scene.shapes))


def blank(scene: Scene) -> Scene:
    """``scene``'s background without any shape."""
    return dataclasses.replace(scene, shapes=())


def wrong_kind(scene: Scene) -> Scene:
    """``scene`` with every shape drawn as the next kind (circle -> square -> triangle -> circle)."""
    return dataclasses.replace(scene, shapes=tuple(
        dataclasses.replace(sh, kind=KINDS[(KINDS.index(sh.kind) + 1) % len(KINDS)]) for sh in scene.shapes))


def one_kind(scene: Scene, kind: str) -> Scene:
    """Shape-blind: a ``kind`` at every named place (the slot's nominal centre and size), in the named
    colour, whatever kind the caption names."""
    return dataclasses.replace(scene, shapes=tuple(
        Shape(kind, sh.color, *_slot(scene, i)) for i, sh in enumerate(scene.shapes)))


def flood(scene: Scene, size: int = 64) -> Image.Image:
    """The whole image in the first named colour (the background colour for a scene without shapes)."""
    color = scene.shapes[0].color if scene.shapes else scene.background
    return Image.new("RGB", (size, size), COLORS[color])


# name -> (what the image is, its image for a scene and the next held-out scene at a size, the kind
# accuracy it must get: (lowest, highest)); "chance" (~1/3) bars are exact in the tests: the fraction of
# named shapes of that kind
CONTROLS = {
    "rendered": ("the rendered scene", lambda s, nxt, n: render(s, n), (0.95, 1.0)),
    "blank": ("its blank background", lambda s, nxt, n: render(blank(s), n), (0.0, 0.0)),
    "flood": ("flooded with the first named colour", lambda s, nxt, n: flood(s, n), (0.0, 0.15)),
    "discs": ("a disc at every named place", lambda s, nxt, n: render(one_kind(s, "circle"), n), (0.2, 0.47)),
    "squares": ("a square at every named place", lambda s, nxt, n: render(one_kind(s, "square"), n), (0.2, 0.47)),
    "triangles": ("a triangle at every named place", lambda s, nxt, n: render(one_kind(s, "triangle"), n),
                  (0.2, 0.47)),
    "wrong_kind": ("every shape as another kind", lambda s, nxt, n: render(wrong_kind(s), n), (0.0, 0.05)),
    "recoloured": ("the shapes recoloured", lambda s, nxt, n: render(recoloured(s), n), (0.0, 0.0)),
    "moved": ("the shapes moved", lambda s, nxt, n: render(moved(s), n), (0.0, 0.1)),
    "chance": ("another held-out scene's image", lambda s, nxt, n: render(nxt, n), (0.0, 0.15)),
}


def controls(n: int = 200, seed: int = 0, size: int = 64) -> dict:
    """The score of every control image (:data:`CONTROLS`) against ``n`` held-out scenes' captions at ``size``
    px: ``{name: {"kind_accuracy", "placement", "background", "bar": [lo, hi], "pass"}}``, with ``n``,
    ``size``, ``rendered_min`` (the lowest kind accuracy of one rendered scene) and ``kind_fractions`` (the
    fraction of named shapes of each kind: what a shape-blind painter of that kind gets)."""
    scenes = held_out_scenes(n + 1, seed)
    out: dict = {"n": n, "size": size}
    for name, (_, make, (lo, hi)) in CONTROLS.items():
        r = score_images([make(scenes[i], scenes[i + 1], size) for i in range(n)], scenes[:n])
        ka = r["kind_accuracy"]
        out[name] = {"kind_accuracy": ka, "placement": r["placement"], "background": r["background"],
                     "bar": [lo, hi], "pass": lo - 1e-9 <= ka <= hi + 1e-9}
        if name == "rendered":
            out["rendered_min"] = min(p["kind_accuracy"] for p in r["per_image"])
    kinds = [sh.kind for sc in scenes[:n] for sh in sc.shapes]
    out["kind_fractions"] = {k: kinds.count(k) / len(kinds) for k in KINDS}
    return out


def controls_text(c: dict) -> str:
    """One line per report: every control's kind accuracy (and placement) against its bar."""
    parts = []
    for name, (what, _, _) in CONTROLS.items():
        r = c[name]
        lo, hi = r["bar"]
        bar = f"= {lo:g}" if lo == hi else (f"≥ {lo:g}" if hi == 1.0 else (f"≤ {hi:g}" if lo == 0 else
                                                                           f"{lo:g}–{hi:g}"))
        parts.append(f"{what} {r['kind_accuracy']:.3f} (bar {bar}{'' if r['pass'] else ', FAIL'}; placement "
                     f"{r['placement']:.3f})")
    return (f"Controls of the score ({c['n']} held-out scenes at {c['size']} px; kind accuracy): "
            + "; ".join(parts) + ".")


def chance_score(n: int = 256, seed: int = 0, size: int = 64) -> float:
    """Kind accuracy of the image rendered for held-out scene ``i + 1`` against scene ``i``'s caption: what
    an image that follows another prompt achieves."""
    scenes = held_out_scenes(n + 1, seed)
    return score_images([render(scenes[i + 1], size) for i in range(n)], scenes[:n])["kind_accuracy"]
