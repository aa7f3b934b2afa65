"""The ``flex`` backend's plans for video layouts (:class:`clear.geometry.TokenLayout` with ``frames > 1``).

Image tokens are reordered into ``1 x tile_h x tile_w`` tiles (one frame each; ``Options.tile``, the image
tile, so one tile is one FlexAttention block) in frame-major, then row-major tile order
(:class:`VideoTileOrder`); the flex sequence is ``[image tiles (padded) | text]`` for queries and ``[image
tiles (padded) | text | pooled]`` for keys, as for images (:class:`clear.backends.flex_blocks.TileOrder`).
The block mask is built from tile boxes, never from an evaluated mask: a query tile and a key tile hold
some allowed pair iff their smallest offsets along each axis do (``gap_y^2 + gap_x^2 < bound(gap_t)``, the
bounds of :meth:`clear.geometry.Window.frame_bounds` falling with ``|dt|``), and every pair iff their
largest offsets do (and the key tile lies inside the grid); only partial blocks evaluate the mask_mod, the
3-D rule after reordering. Every image tile is checked against every image tile (a few hundred tiles at
720p, 81 frames), so building the mask is quadratic in tiles, not in tokens. Tensors are ``[B, S, heads, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import TokenLayout, Window
from .base import Options
from .flex import Plan
from .flex_blocks import _compact


@dataclass(frozen=True)
class VideoTileOrder:
    """Image tokens of a video reordered tile by tile (``1 x tile_h x tile_w`` tiles, padded up to whole tiles,
    tiles and the tokens inside them in frame-major, row-major order)."""

    layout: TokenLayout
    window: Window
    tile_h: int = 8
    tile_w: int = 16

    @property
    def block_size(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def tiles(self) -> tuple[int, int, int]:
        lay = self.layout
        return lay.frames, -(-lay.height // self.tile_h), -(-lay.width // self.tile_w)

    @property
    def num_slots(self) -> int:
        f, ty, tx = self.tiles
        return f * ty * tx * self.block_size

    @property
    def q_len(self) -> int:
        return self.num_slots + self.layout.text_len

    @property
    def kv_len(self) -> int:
        return self.q_len + self.layout.num_pooled(self.window)

    def bounds(self, device=None) -> torch.Tensor:
        """``bound(|dt|)`` for every frame offset of the grid, one more (0) for offsets past it."""
        return torch.tensor((*self.window.frame_bounds(self.layout.frames), 0), dtype=torch.int64, device=device)

    def gather_indices(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(to_flex, from_flex)``: natural-order token of each flex query position (padding slots repeat the
        first image token: hidden as keys, their query rows dropped) and flex position of each natural token."""
        lay = self.layout
        f, h, w = lay.frames, lay.height, lay.width
        _, ty, tx = self.tiles
        pos = torch.arange(lay.num_image, device=device)
        t, y, x = pos // (h * w), (pos // w) % h, pos % w
        tile = (t * ty + y // self.tile_h) * tx + x // self.tile_w
        slots = tile * self.block_size + (y % self.tile_h) * self.tile_w + x % self.tile_w
        img, txt = lay.image_slice, lay.text_slice
        natural = torch.arange(lay.seq_len, device=device)
        to_flex = torch.full((self.q_len,), img.start, dtype=torch.long, device=device)
        to_flex[slots] = natural[img]
        to_flex[self.num_slots:] = natural[txt]
        from_flex = torch.empty(lay.seq_len, dtype=torch.long, device=device)
        from_flex[img] = slots
        from_flex[txt] = torch.arange(self.num_slots, self.q_len, device=device)
        return to_flex, from_flex

    def coords(self, idx):
        """(frame, row, column) of flex image position ``idx`` (tensor arithmetic, usable inside mask_mods)."""
        _, ty, tx = self.tiles
        tile, within = idx // self.block_size, idx % self.block_size
        return (tile // (ty * tx), ((tile // tx) % ty) * self.tile_h + within // self.tile_w,
                (tile % tx) * self.tile_w + within % self.tile_w)


def video_mask_mod(order: VideoTileOrder, device=None):
    """The mask_mod of the flex sequence, :func:`clear.geometry.allowed_mask` after reordering."""
    lay = order.layout
    bounds = order.bounds(device)
    n_slots, text_end, last = order.num_slots, order.num_slots + lay.text_len, bounds.numel() - 1

    def mask_mod(b, h, q_idx, kv_idx):
        qt, qy, qx = order.coords(q_idx)
        kt, ky, kx = order.coords(kv_idx)
        k_img = kv_idx < n_slots
        k_valid = (kt < lay.frames) & (ky < lay.height) & (kx < lay.width)
        bound = bounds[(qt - kt).abs().clamp(max=last)]
        local = (qy - ky) * (qy - ky) + (qx - kx) * (qx - kx) < bound
        k_text = (kv_idx >= n_slots) & (kv_idx < text_end)
        img_query = torch.where(k_img, k_valid & local, True)
        text_query = torch.where(k_img, k_valid, k_text)
        return torch.where(q_idx < n_slots, img_query, text_query)

    return mask_mod


def _block_lists(order: VideoTileOrder, device=None):
    """``(partial_num, partial_idx, full_num, full_idx)`` of every query block, from tile boxes."""
    lay, bs = order.layout, order.block_size
    f, ty, tx = order.tiles
    n_tiles = f * ty * tx
    n_slots, q_len, kv_len = order.num_slots, order.q_len, order.kv_len
    text_end = n_slots + lay.text_len
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    i64 = dict(dtype=torch.int64, device=device)
    bounds = order.bounds(device)
    last = bounds.numel() - 1

    tiles = torch.arange(n_tiles, **i64)
    t0 = tiles // (ty * tx)
    y0, x0 = ((tiles // tx) % ty) * order.tile_h, (tiles % tx) * order.tile_w
    y1, x1 = y0 + order.tile_h - 1, x0 + order.tile_w - 1  # padded extents (queries use them whole)
    vy1, vx1 = y1.clamp(max=lay.height - 1), x1.clamp(max=lay.width - 1)  # keys exist only inside the grid
    k_nonempty = (y0 < lay.height) & (x0 < lay.width)
    k_complete = (y1 < lay.height) & (x1 < lay.width)

    def gap(q0, q1, k0, k1):
        return torch.clamp(torch.maximum(k0[None] - q1[:, None], q0[:, None] - k1[None]), min=0)

    def span(q0, q1, k0, k1):
        return torch.maximum((q1[:, None] - k0[None]).abs(), (k1[None] - q0[:, None]).abs())

    dt = (t0[:, None] - t0[None]).abs().clamp(max=last)
    gy, gx = gap(y0, y1, y0, vy1), gap(x0, x1, x0, vx1)
    sy, sx = span(y0, y1, y0, y1), span(x0, x1, x0, x1)
    local_any = k_nonempty[None] & (gy * gy + gx * gx < bounds[dt])
    local_full = k_complete[None] & (sy * sy + sx * sx < bounds[dt])

    # blocks after the image tiles (text, then pooled): how much of each is text, and whether it is whole
    k_lo = torch.arange(n_tiles, nk, **i64) * bs
    k_hi = torch.clamp(k_lo + bs, max=kv_len)
    k_whole = (k_hi - k_lo) == bs
    k_text = (torch.clamp(k_hi, max=text_end) - torch.clamp(k_lo, min=n_slots, max=text_end)).clamp(min=0)
    all_k = torch.arange(nk, **i64).expand(n_tiles, -1)
    img_full = torch.cat([local_full, k_whole.expand(n_tiles, -1)], 1)
    img_partial = torch.cat([local_any & ~local_full, (~k_whole).expand(n_tiles, -1)], 1)

    # text query blocks see every valid image key and the text keys, never pooled keys
    n_text_q = nq - n_tiles
    q_lo = torch.arange(n_tiles, nq, **i64) * bs
    q_whole = (torch.clamp(q_lo + bs, max=q_len) - q_lo) == bs
    all_kt = torch.arange(nk, **i64).expand(n_text_q, -1)
    txt_any = torch.cat([k_nonempty, k_text > 0])[None, :].expand(n_text_q, -1)
    txt_full = torch.cat([k_complete, k_text == bs])[None, :] & q_whole[:, None]

    p_num, p_idx = _compact(all_k, img_partial, nk)
    f_num, f_idx = _compact(all_k, img_full, nk)
    tp_num, tp_idx = _compact(all_kt, txt_any & ~txt_full, nk)
    tf_num, tf_idx = _compact(all_kt, txt_full, nk)
    return (torch.cat([p_num, tp_num]), torch.cat([p_idx, tp_idx]),
            torch.cat([f_num, tf_num]), torch.cat([f_idx, tf_idx]))


def video_block_mask(order: VideoTileOrder, device=None, with_q_blocks: bool = True):
    """FlexAttention ``BlockMask`` of a video's flex sequence, from tile boxes (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    p_num, p_idx, f_num, f_idx = _block_lists(order, device)
    return BlockMask.from_kv_blocks(
        p_num[None, None], p_idx[None, None], f_num[None, None], f_idx[None, None], BLOCK_SIZE=order.block_size,
        mask_mod=video_mask_mod(order, device), seq_lengths=(order.q_len, order.kv_len),
        compute_q_blocks=with_q_blocks)


def grid_plan(layout: TokenLayout, window: Window, device, options: Options = Options(), with_grad: bool = False):
    """Keys are ``[natural order | pooled]``: the pooled tokens keep their place after the tiles' order."""
    order = VideoTileOrder(layout, window, *options.tile)
    to_flex, from_flex = order.gather_indices(device)
    n_pooled = layout.num_pooled(window)
    kv_to_flex = to_flex if not n_pooled else torch.cat(
        [to_flex, layout.seq_len + torch.arange(n_pooled, device=device)])
    return Plan(layout, to_flex, kv_to_flex, from_flex, video_block_mask(order, device, with_q_blocks=with_grad),
                options)
