"""The ``tiled`` backend: query tiles, each with its gathered key window, in one batched SDPA.

Every image query of a ``tile_h x tile_w`` tile sees the same small neighbourhood of keys: the
tile grown by the window's reach (``halo`` rows and columns on each side), plus the text keys
and the pooled keys. A plan lists, once per layout, the query positions of every tile, the key
positions of its window (``[window box | text | pooled]``) and the boolean mask inside it (the
circle, and the box's cells outside the grid hidden); a call gathers queries and keys with one
``index_select`` each, runs ONE ``scaled_dot_product_attention`` over ``[B * tiles, heads,
tile, window]``, and gathers the output back to natural order. Text queries see every text and
image key (never pooled ones): one unmasked SDPA. The work per image query is the window box
(``(tile_h + 2 halo) (tile_w + 2 halo) + text + pooled`` keys) instead of the whole sequence;
the backward is SDPA's and ``index_select``'s, so it trains on every device. With
``return_lse`` the tiles' logits are computed explicitly in float32 (they are small).

Tiles that lie wholly inside the grid share one mask (the circle): they run as one batch with a
broadcast mask, and only the tiles on the border carry masks of their own, so the plan's memory
grows with the grid's perimeter, not its area.

The tile is chosen from the reach and the number of text and pooled keys (:func:`tile_for`,
measured on CPU, docs/benchmarks.md). Tensors are ``[B, S, heads, D]``; see
:mod:`clear.backends.base` for the plan interface. Registered as :data:`BACKEND` at the end of this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import BandLayout, TokenLayout, Window
from . import dense
from .base import Backend, Options

# Logits materialised at once by the log-sum-exp path (tiles are taken in chunks below it).
MAX_LOGITS = 2**26
# Elements of gathered keys (as many of values) held at once by a forward; more tiles run in chunks.
MAX_GATHERED = 2**27


def reach(window: Window) -> int:
    """The largest |dy| (and |dx|) with ``dy^2 < radius^2``: how far a window reaches from its query."""
    return math.isqrt(window.radius_sq_bound - 1)


def tile_for(halo: int, n_global: int, height: int, width: int) -> tuple[int, int]:
    """The query tile for a reach of ``halo`` with ``n_global`` keys every image query sees (text and pooled)
    on a ``height x width`` grid: 8 x 8, or 16 x 16 where the window reaches 8 tokens or more or there are
    256 global keys or more (each tile gathers its own copy of them: fewer, larger tiles copy less). Measured
    on CPU for head sizes 24 and 128, radii 4, 8, 16 and 32 or 512 text tokens (docs/benchmarks.md)."""
    side = 16 if halo >= 8 or n_global >= 256 else 8
    return min(side, height), min(side, width)


@dataclass
class _Group:
    """Tiles that run as one batch: ``q_idx [tiles, tq]`` query positions, ``kv_idx [tiles, tk]`` key
    positions, ``bias`` ``[tiles or 1, 1, tq, tk]``: 0 where the query sees the key, -inf elsewhere
    (float32; cast to a call's dtype)."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    bias: torch.Tensor


@dataclass
class Plan:
    """The tile groups of one layout (interior tiles share a mask; border tiles have their own), the text
    queries' positions and the gather that puts ``[group outputs | text outputs]`` back in natural order."""

    layout: TokenLayout | BandLayout
    groups: list
    text_q: torch.Tensor | None  # text query positions (whole grids), None for bands
    text_kv: int  # the text queries see keys [0, text_kv) of the natural order
    from_tiles: torch.Tensor  # natural position -> position in the concatenated outputs
    tile: tuple[int, int] = (0, 0)
    backend: str = "tiled"

    def attend(self, query, key, value, scale: float, return_lse: bool = False):
        outs, lses = [], []
        for g in self.groups:
            res = _attend_group(query, key, value, g, scale, return_lse)
            outs.append(res[0] if return_lse else res)
            if return_lse:
                lses.append(res[1])
        if self.text_q is not None:
            q = query.index_select(1, self.text_q)
            res = dense.attend(q, key[:, : self.text_kv], value[:, : self.text_kv], scale, return_lse=return_lse)
            outs.append(res[0] if return_lse else res)
            if return_lse:
                lses.append(res[1])
        out = torch.cat(outs, 1).index_select(1, self.from_tiles)
        if not return_lse:
            return out
        return out.float(), torch.cat(lses, 1).index_select(1, self.from_tiles)


def _attend_group(query, key, value, g: _Group, scale: float, return_lse: bool):
    """The group's tiles as one batch ``[tiles, B * heads, tile, window]`` (the tile leads, so a mask of
    ``[tiles, 1, tq, tk]`` broadcasts over batch and heads without a copy)."""
    b, _, heads, d = query.shape
    n, tq = g.q_idx.shape
    tk = g.kv_idx.shape[1]

    def gather(x, idx, length):  # [B, S, heads, D] -> [tiles, B * heads, length, D]
        x = x.index_select(1, idx.reshape(-1)).reshape(b, n, length, heads, d)
        return x.permute(1, 0, 3, 2, 4).reshape(n, b * heads, length, d)

    chunk = max(1, MAX_GATHERED // max(1, b * heads * tk * d))  # tiles whose keys are gathered at once
    if not return_lse and n > chunk:  # bound the gathered copies (many tiles x long text at high resolution)
        parts = [_attend_group(query, key, value, _Group(g.q_idx[i : i + chunk], g.kv_idx[i : i + chunk],
                                                         g.bias if g.bias.shape[0] == 1 else g.bias[i : i + chunk]),
                               scale, False) for i in range(0, n, chunk)]
        return torch.cat(parts, 1)
    q, k, v = gather(query, g.q_idx, tq), gather(key, g.kv_idx, tk), gather(value, g.kv_idx, tk)
    if not return_lse:
        bias = g.bias if g.bias.dtype == q.dtype else g.bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # [tiles, B*heads, tq, D]
        return out.reshape(n, b, heads, tq, d).permute(1, 0, 3, 2, 4).reshape(b, n * tq, heads, d)
    step = max(1, MAX_LOGITS // max(1, b * heads * tq * tk))
    outs, lses = [], []
    for i in range(0, n, step):
        logits = (q[i : i + step].float() @ k[i : i + step].float().transpose(-1, -2)) * scale
        logits = logits + (g.bias if g.bias.shape[0] == 1 else g.bias[i : i + step]).float()
        lse = logits.logsumexp(-1)
        outs.append((logits - lse[..., None]).exp() @ v[i : i + step].float())
        lses.append(lse)
    out = torch.cat(outs).reshape(n, b, heads, tq, d).permute(1, 0, 3, 2, 4).reshape(b, n * tq, heads, d)
    lse = torch.cat(lses).reshape(n, b, heads, tq).permute(1, 0, 3, 2).reshape(b, n * tq, heads)
    return out, lse


def _tiles(q_rows: int, width: int, row_offset: int, k_rows: int, window: Window, tile: tuple[int, int],
           key_of_cell, global_keys: torch.Tensor, device):
    """The tile groups of ``q_rows x width`` image queries (query position ``row * width + col``) whose
    row ``i`` is row ``i + row_offset`` of a ``k_rows x width`` key grid (``key_of_cell(rows, cols)``: key
    positions), each also seeing ``global_keys``. Returns ``(groups, q_slots)``: ``q_slots [q_rows*width]``
    is each query's position in the groups' concatenated output."""
    th, tw = tile
    halo_y, halo_x = min(reach(window), k_rows - 1), min(reach(window), width - 1)
    kh, kw = th + 2 * halo_y, tw + 2 * halo_x
    nty, ntx = -(-q_rows // th), -(-width // tw)
    i64 = dict(dtype=torch.long, device=device)
    ty, tx = torch.arange(nty, **i64), torch.arange(ntx, **i64)
    # query cells of each tile (padded tiles repeat a real query; their rows are dropped)
    qr = (ty[:, None, None, None] * th + torch.arange(th, **i64)[None, None, :, None]).expand(nty, ntx, th, tw)
    qc = (tx[None, :, None, None] * tw + torch.arange(tw, **i64)[None, None, None, :]).expand(nty, ntx, th, tw)
    q_valid = (qr < q_rows) & (qc < width)
    q_pos = torch.where(q_valid, qr * width + qc, 0).reshape(nty * ntx, th * tw)
    # key cells of each tile's window box, in key-grid rows
    kr = (ty[:, None, None, None] * th + row_offset - halo_y + torch.arange(kh, **i64)[None, None, :, None])
    kc = (tx[None, :, None, None] * tw - halo_x + torch.arange(kw, **i64)[None, None, None, :])
    kr, kc = kr.expand(nty, ntx, kh, kw), kc.expand(nty, ntx, kh, kw)
    k_valid = (kr >= 0) & (kr < k_rows) & (kc >= 0) & (kc < width)
    k_pos = torch.where(k_valid, key_of_cell(kr.clamp(0, k_rows - 1), kc.clamp(0, width - 1)), 0)
    n_tiles, tq, nb = nty * ntx, th * tw, kh * kw
    k_pos = torch.cat([k_pos.reshape(n_tiles, nb), global_keys[None].expand(n_tiles, -1)], 1)
    # the circle: query (i, j) of the tile against box cell (a, b) is offset (a - halo_y - i, b - halo_x - j)
    dy = torch.arange(kh, **i64)[None, :] - halo_y - torch.arange(th, **i64)[:, None]  # [th, kh]
    dx = torch.arange(kw, **i64)[None, :] - halo_x - torch.arange(tw, **i64)[:, None]  # [tw, kw]
    circle = (dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2 < window.radius_sq_bound).reshape(tq, nb)
    glob = torch.ones(tq, global_keys.numel(), dtype=torch.bool, device=device)
    shared = torch.cat([circle, glob], 1)  # [tq, nb + globals]
    inside = k_valid.reshape(n_tiles, nb).all(1)
    groups = []
    order = []
    for sel, own_mask in ((inside, False), (~inside, True)):
        ids = sel.nonzero().flatten()
        if not ids.numel():
            continue
        if own_mask:
            valid = torch.cat([k_valid.reshape(n_tiles, nb)[ids], glob[:1].expand(ids.numel(), -1)], 1)
            mask = shared[None] & valid[:, None, :]
            # padding queries (outside the grid; their rows are dropped) see every valid key, so that no row is
            # all -inf (a NaN there would reach the gradient of the real token their position repeats)
            padding = ~q_valid.reshape(n_tiles, tq)[ids]
            mask = torch.where(padding[:, :, None], valid[:, None, :], mask)[:, None]
        else:
            mask = shared[None, None]
        bias = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
        groups.append(_Group(q_pos[ids].contiguous(), k_pos[ids].contiguous(), bias))
        order.append(ids)
    # each query's slot in the concatenated group outputs (tile-major, then the cell inside the tile)
    tiles = torch.cat(order)
    slot_of_tile = torch.empty(n_tiles, **i64)
    slot_of_tile[tiles] = torch.arange(n_tiles, **i64)
    rows = torch.arange(q_rows, **i64).repeat_interleave(width)
    cols = torch.arange(width, **i64).repeat(q_rows)
    tile_id = (rows // th) * ntx + cols // tw
    q_slots = slot_of_tile[tile_id] * tq + (rows % th) * tw + cols % tw
    return groups, q_slots


def grid_plan(layout: TokenLayout, window: Window, device, options: Options = Options(), with_grad: bool = False):
    """Queries in natural order; keys ``[natural order | pooled]``."""
    device = torch.device(device)
    h, w, t = layout.height, layout.width, layout.text_len
    img0 = layout.image_slice.start
    n_pooled = layout.num_pooled(window)
    tile = options.query_tile or tile_for(reach(window), t + n_pooled, h, w)
    txt = torch.arange(layout.text_slice.start, layout.text_slice.stop, device=device)
    global_keys = torch.cat([txt, layout.seq_len + torch.arange(n_pooled, device=device)])
    groups, q_slots = _tiles(h, w, 0, h, window, tile, lambda r, c: img0 + r * w + c, global_keys, device)
    # the group outputs hold ``img0 + position`` queries: shift their positions into the natural order
    for g in groups:
        g.q_idx = g.q_idx + img0
    n_out = sum(g.q_idx.numel() for g in groups)
    from_tiles = torch.empty(layout.seq_len, dtype=torch.long, device=device)
    from_tiles[layout.image_slice] = q_slots
    from_tiles[layout.text_slice] = n_out + torch.arange(t, device=device)
    return Plan(layout, groups, txt if t else None, layout.seq_len, from_tiles, tile)


def band_plan(band: BandLayout, window: Window, device, options: Options = Options()):
    """Queries: the band's image tokens (row-major); keys ``[text | extended band | pooled]``."""
    device = torch.device(device)
    win = Window(window.radius)  # pooled keys are counted by the band itself
    t, w = band.text_len, band.width
    tile = options.query_tile or tile_for(reach(win), t + band.n_pooled, band.rows, w)
    global_keys = torch.cat([torch.arange(t, device=device),
                             t + band.ext_rows * w + torch.arange(band.n_pooled, device=device)])
    groups, q_slots = _tiles(band.rows, w, band.above, band.ext_rows, win, tile, lambda r, c: t + r * w + c,
                             global_keys, device)
    return Plan(band, groups, None, 0, q_slots, tile)


def attend(query, key, value, scale: float, *, return_lse: bool = False, options: Options = Options()):
    """Unmasked attention (the text queries of patch parallelism): the dense backend's."""
    return dense.attend(query, key, value, scale, return_lse=return_lse)


# Its registration: a backward everywhere (SDPA's and index_select's), pooled keys; windows only.
BACKEND = Backend("tiled", "query tiles with their gathered key windows in one batched scaled_dot_product_attention; "
                  "a backward everywhere", grid_plan, band_plan, attend, full_attention=False)
