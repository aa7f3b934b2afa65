"""Outputs people look at: PNGs that carry the settings that made them, side-by-side grids
with labels, and the timing labels of those grids."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..files import save_image

if TYPE_CHECKING:
    from .pipeline import Result


def png_metadata(settings: dict):
    """PNG text chunks: one per setting (``clear:<name>``) and all of them as JSON (``clear:settings``)."""
    info = PngInfo()
    info.add_text("Software", f"clear {__version__}")
    for k, v in settings.items():
        info.add_text(f"clear:{k}", str(v))
    info.add_text("clear:settings", json.dumps(settings, default=str, sort_keys=True))
    return info


def save_png(image, path: str | os.PathLike, settings: dict | None = None) -> str:
    """Write ``image`` as PNG atomically (:func:`clear.files.save_image`) with ``settings``
    in its text chunks; read them back with ``PIL.Image.open(path).text``."""
    return str(save_image(image, path, "PNG", pnginfo=png_metadata(settings or {})))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def image_grid(images, labels=None, max_side: int = 2048, columns: int | None = None):
    """Images side by side (``columns`` per row; default all in one row), each under its label,
    scaled down so that no panel's long side exceeds ``max_side``."""
    images = [im.convert("RGB") for im in images]
    labels = list(labels) if labels is not None else [""] * len(images)
    panels = []
    for im in images:
        s = min(1.0, max_side / max(im.size))
        panels.append(im if s == 1.0 else im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                                                    Image.LANCZOS))
    columns = columns or len(panels)
    cell_w, cell_h = max(p.width for p in panels), max(p.height for p in panels)
    font_px = max(10, min(40, cell_w // 24))
    font = _font(font_px)
    label_h = font_px + 8 if any(labels) else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max([cell_w] + [int(measure.textlength(t, font=font)) + 6 for t in labels])  # labels fit
    rows = -(-len(panels) // columns)
    pad = 4
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (p, label) in enumerate(zip(panels, labels)):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + label_h + pad)
        if label:
            draw.text((x + 2, y + 2), label, fill="black", font=font)
        grid.paste(p, (x, y + label_h))
    return grid


def timing_label(result: Result, name: str, reference: Result | None = None) -> str:
    """"NAME: 1.23 s" under a grid panel; with a ``reference``, also its speed-up over it, e.g. "(2.00x)"."""
    text = f"{name}: {result.seconds:.2f} s"
    if reference is not None and result.seconds > 0:
        text += f" ({reference.seconds / result.seconds:.2f}x)"
    return text
