"""The ``tiled`` backend's plans for video layouts (:class:`clear.geometry.TokenLayout` with ``frames > 1``).

The same idea as the image plans of :mod:`clear.backends.tiled`, one dimension up: image queries are cut into
``tile_t x tile_h x tile_w`` query tiles (frames x rows x columns); each tile gathers the box of keys its
queries can reach, ``min(tile + 2 halo, size)`` along each axis (``halo``: the window's reach, temporal from
:meth:`clear.geometry.Window.frame_bounds`, spatial ``floor(sqrt(bound - 1))``); the text and pooled keys are
gathered into every tile or run as their own call merged by log-sum-exp, as for images
(:func:`clear.backends.tiled.split_for`). Boxes are shifted to stay inside the grid (never a key outside it, so no cell of a box is wasted on
padding and a window as large as the grid gathers the grid once), which makes a tile's mask depend only on
where its box sits relative to it and on how much of the tile is inside the grid: along each axis the tiles
fall into a few such classes (interior, and a few near each border), and the tiles of one class triple share
one mask and run as one batch.

Inside a box the mask is the 3-D rule of :mod:`clear.geometry`: ``dy^2 + dx^2 < bound(|dt|)``. Padding
queries of a tile (past the grid's end; they repeat a real query and their rows are dropped) see every key
of their box. The plan is a :class:`clear.backends.tiled.Plan`: its ``attend`` is the image plans' one.

The query tile: ``Options.query_tile`` as ``(t, h, w)``, else the image rule
(:func:`clear.backends.tiled.tile_for`) for ``h x w`` and ``tile_t = max(1, min(frames, temporal halo, 4))``
(a chosen, not yet measured, trade: a taller tile shares its box's frames among more queries). The plan keeps each
class's mask as its factors (offsets per axis) and builds it per call (:class:`VideoPlan`). Tensors are
``[B, S, heads, D]``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..geometry import TokenLayout, Window
from .base import Options
from .tiled import Plan, _Group, reach, split_for, tile_for

# Frames of a query tile at most (the temporal reach, up to this): more frames share a box's keys among more queries,
# but grow every tile's mask (tq x tk). Chosen, not measured.
MAX_TILE_FRAMES = 4


@dataclass
class _WindowGroup:
    """Tiles of one class: ``q_idx [tiles, tq]``, ``kv_idx [tiles, tk + globals]`` and the factors of their shared
    mask: frame offsets ``dt [tile_t, box_t]`` (absolute), row and column offsets ``dy [tile_h, box_h]``,
    ``dx [tile_w, box_w]``, which tile cells are real queries (``real [tq]``) and the bounds per ``|dt|``."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    dt: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    real: torch.Tensor
    bounds: torch.Tensor
    sink: bool = False

    def build(self) -> _Group:
        """The group with its mask as the image plans hold it: bias ``[1, 1, tq, tk + gathered shared (+ 1 with
        the sink key)]``."""
        d2 = self.dy[:, None, :, None] ** 2 + self.dx[None, :, None, :] ** 2  # [th, tw, bh, bw]
        local = d2[None, :, :, None] < self.bounds[self.dt][:, None, None, :, None, None]  # [tt, th, tw, bt, bh, bw]
        tq = self.real.numel()
        local = local.reshape(tq, -1) | ~self.real[:, None]  # padding queries see their whole box
        n_other = self.kv_idx.shape[1] - local.shape[1] + int(self.sink)  # gathered shared keys, the sink key
        mask = torch.cat([local, local.new_ones(tq, n_other)], 1)
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        return _Group(self.q_idx, self.kv_idx, bias[None, None], self.sink)


@dataclass
class VideoPlan(Plan):
    """A :class:`clear.backends.tiled.Plan` whose groups keep only their masks' factors (``_WindowGroup``): each
    call builds the masks (``tq x tk`` per class, elementwise, small next to the attention itself) instead of the
    plan holding them, which at 720p with a radius of 16 would be gigabytes."""

    def attend(self, query, key, value, scale: float, return_lse: bool = False):
        built = Plan(self.layout, [g.build() for g in self.groups], self.image, self.from_tiles, text=self.text,
                     text_kv=self.text_kv, tile=self.tile, shared=self.shared, explicit=self.explicit,
                     backend=self.backend)  # fields by name: dataclasses.fields() would break a compiled graph
        return built.attend(query, key, value, scale, return_lse)


def video_tile(layout: TokenLayout, window: Window, options: Options = Options()) -> tuple[int, int, int]:
    """The query tile ``(frames, rows, columns)`` of a video layout (see the module docstring)."""
    f, h, w = layout.frames, layout.height, layout.width
    tile = options.query_tile
    if tile is not None and len(tile) == 3:
        return min(tile[0], f), min(tile[1], h), min(tile[2], w)
    halo_t = window.temporal_reach(f)
    n_shared = layout.text_len + layout.num_pooled(window)
    gathered = 0 if split_for(n_shared, math.inf) is not None else n_shared  # split off: no copy per tile
    th, tw = tile if tile is not None else tile_for(reach(window), gathered, h, w)
    return max(1, min(f, halo_t, MAX_TILE_FRAMES)), min(th, h), min(tw, w)


def _axis_classes(size: int, tile: int, halo: int) -> tuple[int, dict]:
    """Along one axis of ``size`` cells: the box length and, by class ``(box start - tile start, cells of the
    tile inside the axis)``, the tile starts of that class."""
    box = min(tile + 2 * halo, size)
    classes: dict[tuple[int, int], list[int]] = {}
    for start in range(0, size, tile):
        box_start = min(max(start - halo, 0), size - box)
        classes.setdefault((box_start - start, min(tile, size - start)), []).append(start)
    return box, classes


def grid_plan(layout: TokenLayout, window: Window, device, options: Options = Options(), with_grad: bool = False):
    """Queries in natural order (``[text | frames x height x width]`` or the image first); keys
    ``[natural order | pooled]``."""
    device = torch.device(device)
    f, h, w, t = layout.frames, layout.height, layout.width, layout.text_len
    img0, hw = layout.image_slice.start, h * w
    n_pooled = layout.num_pooled(window)
    tile = video_tile(layout, window, options)
    halo = (window.temporal_reach(f), min(reach(window), h - 1), min(reach(window), w - 1))
    axes = [_axis_classes(n, tl, hl) for n, tl, hl in zip((f, h, w), tile, halo)]
    boxes = tuple(box for box, _ in axes)
    bounds = torch.tensor(window.frame_bounds(boxes[0] + tile[0] + 1), device=device)  # every |dt| in a box
    shared = torch.cat([torch.arange(layout.text_slice.start, layout.text_slice.stop, device=device),
                        layout.seq_len + torch.arange(n_pooled, device=device)])
    tq, tk = tile[0] * tile[1] * tile[2], boxes[0] * boxes[1] * boxes[2]
    explicit = split_for(shared.numel(), tk)  # as the image plans: gathered into every tile, or their own call
    global_keys = shared if explicit is None else shared[:0]
    i64 = dict(dtype=torch.long, device=device)

    groups, from_image, offset = [], torch.empty(layout.num_image, **i64), 0  # image query -> its output slot
    for (ct, st), (cy, sy), (cx, sx) in itertools.product(*(cls.items() for _, cls in axes)):
        rel, valid_n = (ct[0], cy[0], cx[0]), (ct[1], cy[1], cx[1])
        # per axis: query cells [tiles_d, tile_d] (clamped to the axis: padding repeats a real cell) and box cells
        q_cells, k_cells, q_real = [], [], []
        for starts, tl, r, nv, box, size in zip((st, sy, sx), tile, rel, valid_n, boxes, (f, h, w)):
            s = torch.tensor(starts, **i64)[:, None]
            q_cells.append((s + torch.arange(tl, **i64)).clamp(max=size - 1))
            k_cells.append(s + r + torch.arange(box, **i64))
            q_real.append(torch.arange(tl, **i64) < nv)

        def positions(cells):  # [n_t, a], [n_y, b], [n_x, c] -> [n_t * n_y * n_x, a * b * c] natural positions
            ct_, cy_, cx_ = cells
            pos = (ct_[:, None, None, :, None, None] * hw + cy_[None, :, None, None, :, None] * w
                   + cx_[None, None, :, None, None, :])
            n = ct_.shape[0] * cy_.shape[0] * cx_.shape[0]
            return img0 + pos.reshape(n, -1)

        q_idx, k_idx = positions(q_cells), positions(k_cells)
        n = q_idx.shape[0]
        # the window inside the box: query cell (i, j, k) against box cell (a, b, c) is offset rel + box - query
        dt, dy, dx = (r + torch.arange(box, **i64)[None, :] - torch.arange(tl, **i64)[:, None]
                      for r, box, tl in zip(rel, boxes, tile))
        real = q_real[0][:, None, None] & q_real[1][None, :, None] & q_real[2][None, None, :]  # [tt, th, tw]
        groups.append(_WindowGroup(q_idx, torch.cat([k_idx, global_keys[None].expand(n, -1)], 1), dt.abs(), dy, dx,
                                   real.reshape(tq), bounds, explicit == "shared"))
        # where each real query's output lands in the concatenated group outputs
        slots = offset + torch.arange(n * tq, **i64).reshape(n, tq)
        keep = real.reshape(1, tq).expand(n, -1)
        from_image[q_idx[keep] - img0] = slots[keep]
        offset += n * tq
    return VideoPlan(layout, groups, layout.image_slice, from_image, layout.text_slice if t else None, layout.seq_len,
                     tile, None if explicit is None else shared, explicit)
