"""Pictures of CLEAR's attention pattern: which keys one image query sees.

:func:`draw_mask` draws, for one query on an ``height x width`` token grid, three panels
from :func:`clear.geometry.allowed_mask` (the same mask the ``dense`` backend uses): the
text keys (a strip, wrapped), the image keys (the circular window, the query in red, the
circle ``dy^2 + dx^2 = r^2`` outlined) and, for down-sampled variants, the pooled keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .geometry import TokenLayout, Window, allowed_mask
from .inference import save_png

SEEN = (66, 133, 244)
UNSEEN = (228, 228, 228)
QUERY = (219, 68, 55)
OUTLINE = (30, 30, 30)


@dataclass
class MaskPicture:
    """The picture and where its panels are: each box is ``(x0, y0, columns, rows)`` in
    cells of ``cell`` pixels (pooled cells are ``cell * down_factor`` pixels)."""

    image: object  # PIL.Image
    cell: int
    text_box: tuple[int, int, int, int] | None
    image_box: tuple[int, int, int, int]
    pooled_box: tuple[int, int, int, int] | None
    seen: int  # keys the query sees
    total: int  # keys there are

    def save(self, path: str | os.PathLike) -> str:
        return save_png(self.image, path, {"seen": self.seen, "total": self.total})


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_mask(height: int, width: int, radius: float | None, down_factor: int = 1, text_len: int = 16,
              query: tuple[int, int] | None = None, cell: int = 12) -> MaskPicture:
    """Which keys the image query at grid position ``query`` = (row, col) (default: the
    centre) sees, on a ``height x width`` token grid (pixels / 16 for FLUX) with
    ``text_len`` text tokens, for CLEAR with ``radius`` (``None`` = full attention) and
    ``down_factor``. Blue: seen; grey: not seen; red: the query."""
    window = Window(radius, down_factor)
    layout = TokenLayout(text_len, height, width, text_first=True)
    ph, pw = layout.pooled_grid(window)
    qr, qc = query if query is not None else (height // 2, width // 2)
    if not (0 <= qr < height and 0 <= qc < width):
        raise ValueError(f"query {(qr, qc)} is outside the {height}x{width} token grid")
    row = allowed_mask(layout, window)[text_len + qr * width + qc]
    text_seen, img_seen, pool_seen = row[:text_len], row[text_len:layout.seq_len], row[layout.seq_len:]

    margin, gap, font_px = 10, 16, max(11, cell)
    font = _font(font_px)
    label_h = font_px + 6
    img_w = width * cell
    pooled_w = pw * down_factor * cell if ph else 0
    panel_w = img_w + (gap + pooled_w if ph else 0)
    text_cols = max(1, min(text_len, panel_w // cell)) if text_len else 0
    text_rows = -(-text_len // text_cols) if text_len else 0

    title_y = margin
    y = title_y + label_h
    text_box = None
    if text_len:
        text_box = (margin, y + label_h, text_cols, text_rows)
        y = y + label_h + text_rows * cell + gap
    image_box = (margin, y + label_h, width, height)
    pooled_box = (margin + img_w + gap, y + label_h, pw, ph) if ph else None
    total_h = y + label_h + height * cell + margin
    total_w = margin * 2 + max(panel_w, text_cols * cell, 360)

    pic = Image.new("RGB", (total_w, total_h), "white")
    draw = ImageDraw.Draw(pic)
    seen, total = int(row.sum()), int(row.numel())
    rtxt = "full attention" if radius is None else f"radius {radius:g}"
    draw.text((margin, title_y), f"query ({qr}, {qc}) on a {height}x{width} grid, {rtxt}"
              + (f", down_factor {down_factor}" if ph else "") + f": sees {seen} of {total} keys",
              fill="black", font=font)

    def cells(x0, y0, cols, flags, size):
        for i, ok in enumerate(flags.tolist()):
            x, yy = x0 + (i % cols) * size, y0 + (i // cols) * size
            draw.rectangle([x, yy, x + size - 2, yy + size - 2], fill=SEEN if ok else UNSEEN)

    if text_box:
        draw.text((margin, text_box[1] - label_h), f"text keys ({text_len})", fill="black", font=font)
        cells(text_box[0], text_box[1], text_cols, text_seen, cell)
    draw.text((margin, image_box[1] - label_h), f"image keys ({height}x{width})", fill="black", font=font)
    cells(image_box[0], image_box[1], width, img_seen, cell)
    qx, qy = image_box[0] + qc * cell, image_box[1] + qr * cell
    draw.rectangle([qx, qy, qx + cell - 2, qy + cell - 2], fill=QUERY)
    if radius is not None:
        # the circle dy^2 + dx^2 = r^2, clipped to the image panel
        layer = Image.new("RGBA", (img_w, height * cell), (0, 0, 0, 0))
        cx, cy, rad = qc * cell + (cell - 1) / 2, qr * cell + (cell - 1) / 2, radius * cell
        ImageDraw.Draw(layer).ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=OUTLINE + (255,), width=1)
        pic.paste(layer, image_box[:2], layer)
    if pooled_box:
        draw.text((pooled_box[0], pooled_box[1] - label_h), f"pooled keys ({ph}x{pw})", fill="black", font=font)
        cells(pooled_box[0], pooled_box[1], pw, pool_seen, cell * down_factor)
    return MaskPicture(pic, cell, text_box, image_box, pooled_box, seen, total)


def cell_color(picture: MaskPicture, panel: str, row: int, col: int) -> tuple[int, int, int]:
    """The most common colour inside one cell of a panel (``"text"``, ``"image"``, ``"pooled"``)."""
    box = {"text": picture.text_box, "image": picture.image_box, "pooled": picture.pooled_box}[panel]
    size = picture.cell * (picture.image_box[2] // max(1, picture.pooled_box[2]) if panel == "pooled" else 1)
    x0, y0 = box[0] + col * size, box[1] + row * size
    crop = picture.image.crop((x0, y0, x0 + size - 1, y0 + size - 1))
    return max(crop.getcolors(size * size), key=lambda c: c[0])[1]
