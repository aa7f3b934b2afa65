"""FlexAttention's tiling and block masks: the layout the ``flex`` backend hands its kernel.

Image tokens are reordered into compact ``tile_h x tile_w`` tiles (:class:`TileOrder`), one
FlexAttention block each, and the block-sparse structure is computed analytically from tile
rectangles (:func:`analytic_block_mask`, :func:`band_block_mask`), never from an evaluated mask:
blocks outside the window are never visited, blocks wholly inside it are passed as full blocks
(no per-element mask work), and only the partial blocks evaluate the ``mask_mod``, which equals
:func:`clear.geometry.allowed_mask` after reordering (the tests check both against FlexAttention's
own ``create_block_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import TokenLayout, Window

__all__ = ["TileOrder", "flex_mask_mod", "analytic_block_mask", "band_mask_mod", "band_block_mask",
           "reference_block_mask"]


@dataclass(frozen=True)
class TileOrder:
    """Image tokens reordered tile by tile: each ``tile_h x tile_w`` tile of the grid
    (padded up to whole tiles) is one contiguous run of ``tile_h * tile_w`` tokens, the
    FlexAttention block size. Tiles go in row-major order; so do tokens inside a tile.

    The flex sequence is ``[image tiles (padded) | text | pooled]`` for keys and
    ``[image tiles (padded) | text]`` for queries."""

    layout: TokenLayout
    window: Window
    tile_h: int = 8
    tile_w: int = 16

    @property
    def block_size(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def tiles_h(self) -> int:
        return -(-self.layout.height // self.tile_h)

    @property
    def tiles_w(self) -> int:
        return -(-self.layout.width // self.tile_w)

    @property
    def num_slots(self) -> int:
        """Image positions in tile order, padding included (a multiple of the block size)."""
        return self.tiles_h * self.tiles_w * self.block_size

    @property
    def q_len(self) -> int:
        return self.num_slots + self.layout.text_len

    @property
    def kv_len(self) -> int:
        return self.q_len + self.layout.num_pooled(self.window)

    def slot_of_token(self, device=None) -> torch.Tensor:
        """For each image token in row-major order, its slot in tile order."""
        h, w = self.layout.height, self.layout.width
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        tile = (rows // self.tile_h) * self.tiles_w + cols // self.tile_w
        within = (rows % self.tile_h) * self.tile_w + cols % self.tile_w
        return tile * self.block_size + within

    def gather_indices(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(to_flex, from_flex)``: natural-order token index of each flex query position
        (padding slots repeat an arbitrary real token: the mask hides them as keys and their
        query rows are dropped), and flex position of each natural-order token."""
        lay = self.layout
        slots = self.slot_of_token(device)
        img, txt = lay.image_slice, lay.text_slice
        natural = torch.arange(lay.seq_len, device=device)
        to_flex = torch.full((self.q_len,), img.start, dtype=torch.long, device=device)
        to_flex[slots] = natural[img]
        to_flex[self.num_slots:] = natural[txt]
        from_flex = torch.empty(lay.seq_len, dtype=torch.long, device=device)
        from_flex[img] = slots
        from_flex[txt] = torch.arange(self.num_slots, self.q_len, device=device)
        return to_flex, from_flex

    def params(self, device=None) -> torch.Tensor:
        """Geometry as a tensor, so mask code never specialises on (and recompiles for) sizes."""
        lay = self.layout
        return torch.tensor(
            [lay.height, lay.width, self.tiles_w, self.tile_h, self.tile_w, self.num_slots,
             self.num_slots + lay.text_len, self.window.radius_sq_bound],
            dtype=torch.int64, device=device,
        )


def _tile_coords(idx, tiles_w, tile_h, tile_w):
    """(row, col) of tile-order position ``idx`` (tensor arithmetic, usable inside mask_mods)."""
    bs = tile_h * tile_w
    tile, within = idx // bs, idx % bs
    return (tile // tiles_w) * tile_h + within // tile_w, (tile % tiles_w) * tile_w + within % tile_w


def _tile_rects(tiles: torch.Tensor, order: "TileOrder", row_offset: int = 0):
    """Rows ``r0..r1`` and columns ``c0..c1`` covered by tile numbers ``tiles`` (padding included)."""
    r0 = (tiles // order.tiles_w) * order.tile_h + row_offset
    c0 = (tiles % order.tiles_w) * order.tile_w
    return r0, r0 + order.tile_h - 1, c0, c0 + order.tile_w - 1


def _rect_classes(q, k, height: int, width: int, bound: int):
    """``(any, full)`` for query rectangles ``q`` against key rectangles ``k`` (each
    ``(r0, r1, c0, c1)``, broadcast), keys existing only inside ``height x width``: some /
    every pair is within the window (``dy^2 + dx^2 < bound``). Exact for rectangles."""
    qr0, qr1, qc0, qc1 = q
    kr0, kr1, kc0, kc1 = k
    vr1, vc1 = kr1.clamp(max=height - 1), kc1.clamp(max=width - 1)
    gap_r = torch.clamp(torch.maximum(kr0 - qr1, qr0 - vr1), min=0)
    gap_c = torch.clamp(torch.maximum(kc0 - qc1, qc0 - vc1), min=0)
    span_r = torch.maximum((qr1 - kr0).abs(), (kr1 - qr0).abs())
    span_c = torch.maximum((qc1 - kc0).abs(), (kc1 - qc0).abs())
    any_ = (kr0 < height) & (kc0 < width) & (gap_r**2 + gap_c**2 < bound)
    full = (kr1 < height) & (kc1 < width) & (span_r**2 + span_c**2 < bound)
    return any_, full


def flex_mask_mod(order: TileOrder, device=None):
    """The mask_mod of the flex sequence (see :class:`TileOrder`), equal to
    :func:`allowed_mask` after reordering. Evaluated only on partial blocks."""
    p = order.params(device)

    def mask_mod(b, h, q_idx, kv_idx):
        height, width, tiles_w, tile_h, tile_w = p[0], p[1], p[2], p[3], p[4]
        n_slots, text_end, r2 = p[5], p[6], p[7]
        qr, qc = _tile_coords(q_idx, tiles_w, tile_h, tile_w)
        kr, kc = _tile_coords(kv_idx, tiles_w, tile_h, tile_w)
        k_img = kv_idx < n_slots
        k_valid = (kr < height) & (kc < width)
        local = (qr - kr) * (qr - kr) + (qc - kc) * (qc - kc) < r2
        k_text = (kv_idx >= n_slots) & (kv_idx < text_end)
        img_query = torch.where(k_img, k_valid & local, True)
        text_query = torch.where(k_img, k_valid, k_text)
        return torch.where(q_idx < n_slots, img_query, text_query)

    return mask_mod


def _tile_offsets(order: TileOrder) -> list[tuple[int, int]]:
    """Tile offsets (dy, dx) whose tiles can hold a key within the radius of a query tile."""
    bound = order.window.radius_sq_bound

    def reach(n_tiles, size):  # smallest row (col) distance between tiles `d` apart is max(0, d*size - size + 1)
        return [d for d in range(n_tiles) if max(0, d * size - size + 1) ** 2 < bound]

    ys, xs = reach(order.tiles_h, order.tile_h), reach(order.tiles_w, order.tile_w)
    return [(dy, dx) for dy in sorted({-y for y in ys} | set(ys)) for dx in sorted({-x for x in xs} | set(xs))
            if max(0, abs(dy) * order.tile_h - order.tile_h + 1) ** 2
            + max(0, abs(dx) * order.tile_w - order.tile_w + 1) ** 2 < bound]


def _compact(candidates: torch.Tensor, keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the kept candidate block indices first (candidates are ascending), padded to ``width``."""
    num = keep.sum(-1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    idx = torch.zeros(candidates.shape[0], max(width, candidates.shape[1]), dtype=torch.int32,
                      device=candidates.device)
    idx[:, : candidates.shape[1]] = candidates.gather(-1, order).to(torch.int32)
    return num, idx[:, :width]  # kept candidates are distinct blocks, so at most `width` of them


def _block_lists(order: TileOrder, device=None):
    """Partial and full key blocks of every query block, from tile rectangles, never from
    a mask: ``(partial_num, partial_idx, full_num, full_idx)`` with ``[q_blocks]`` counts
    and ``[q_blocks, kv_blocks]`` indices (ascending, valid ones first).

    Image query tiles only look at the few neighbour tiles the window can reach, so the
    work is linear in the number of tiles. A block reaching past the end of the sequence
    is never full (as FlexAttention's own ``create_block_mask`` counts it)."""
    lay, win, bs = order.layout, order.window, order.block_size
    tiles_h, tiles_w = order.tiles_h, order.tiles_w
    n_tiles = tiles_h * tiles_w
    n_slots, q_len, kv_len = order.num_slots, order.q_len, order.kv_len
    text_end = n_slots + lay.text_len
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    i64 = dict(dtype=torch.int64, device=device)

    # Blocks after the image tiles (text, then pooled): how much of each is text, and whether it is whole.
    k_lo = torch.arange(n_tiles, nk, **i64) * bs
    k_hi = torch.clamp(k_lo + bs, max=kv_len)
    k_whole = (k_hi - k_lo) == bs
    k_text = (torch.clamp(k_hi, max=text_end) - torch.clamp(k_lo, min=n_slots, max=text_end)).clamp(min=0)
    rest = torch.arange(n_tiles, nk, **i64)

    # Tile rectangles (queries use them whole, keys only their part inside the grid).
    t = torch.arange(n_tiles, **i64)
    tr0, tr1, tc0, tc1 = _tile_rects(t, order)
    k_nonempty = (tr0 < lay.height) & (tc0 < lay.width)
    k_complete = (tr1 < lay.height) & (tc1 < lay.width)

    # Image query tiles x neighbour tiles.
    offsets = torch.tensor(_tile_offsets(order), **i64).reshape(-1, 2)
    ky = (t // tiles_w)[:, None] + offsets[None, :, 0]
    kx = (t % tiles_w)[:, None] + offsets[None, :, 1]
    inside = (ky >= 0) & (ky < tiles_h) & (kx >= 0) & (kx < tiles_w)
    kt = torch.where(inside, ky * tiles_w + kx, 0)
    local_any, local_full = _rect_classes([v[:, None] for v in (tr0, tr1, tc0, tc1)], _tile_rects(kt, order),
                                          lay.height, lay.width, win.radius_sq_bound)
    local_any, local_full = inside & local_any, inside & local_full
    cand = torch.cat([kt, rest.expand(n_tiles, -1)], 1)
    img_full = torch.cat([local_full, k_whole.expand(n_tiles, -1)], 1)
    img_partial = torch.cat([local_any & ~local_full, (~k_whole).expand(n_tiles, -1)], 1)

    # Text query blocks see every valid image key and the text keys, never pooled keys.
    n_text_q = nq - n_tiles
    q_whole = (torch.clamp(torch.arange(n_tiles, nq, **i64) * bs + bs, max=q_len)
               - torch.arange(n_tiles, nq, **i64) * bs) == bs
    all_k = torch.arange(nk, **i64).expand(n_text_q, -1)
    txt_any = torch.cat([k_nonempty, k_text > 0])[None, :].expand(n_text_q, -1)
    txt_full = torch.cat([k_complete, k_text == bs])[None, :] & q_whole[:, None]

    p_num, p_idx = _compact(cand, img_partial, nk)
    f_num, f_idx = _compact(cand, img_full, nk)
    tp_num, tp_idx = _compact(all_k, txt_any & ~txt_full, nk)
    tf_num, tf_idx = _compact(all_k, txt_full, nk)
    return (torch.cat([p_num, tp_num]), torch.cat([p_idx, tp_idx]),
            torch.cat([f_num, tf_num]), torch.cat([f_idx, tf_idx]))


def analytic_block_mask(order: TileOrder, device=None, with_q_blocks: bool = True):
    """FlexAttention ``BlockMask`` built from tile geometry with ``from_kv_blocks``:
    fully-inside blocks are passed as full blocks (no mask evaluation), partial blocks
    carry :func:`flex_mask_mod`. Broadcasts over batch and heads. ``with_q_blocks=False``
    skips the transposed (query-major) indices, which only the backward pass reads."""
    from torch.nn.attention.flex_attention import BlockMask

    if order.window.radius is None:
        raise ValueError("full attention needs no block mask: use scaled_dot_product_attention")
    p_num, p_idx, f_num, f_idx = _block_lists(order, device)
    return BlockMask.from_kv_blocks(
        p_num[None, None], p_idx[None, None], f_num[None, None], f_idx[None, None],
        BLOCK_SIZE=order.block_size,
        mask_mod=flex_mask_mod(order, device),
        seq_lengths=(order.q_len, order.kv_len),
        compute_q_blocks=with_q_blocks,
    )


def band_mask_mod(kv_order: TileOrder, row_offset: int, device=None):
    """Mask of a band's image queries (tile order of the band) against ``[extended band
    (band plus halos) in tile order | rest]`` keys, where the ``rest`` (text and pooled
    tokens) is seen by every image query. Query row ``i`` of the band is row
    ``i + row_offset`` of the extended band. The tile shape of queries and keys is the same."""
    p = torch.tensor([kv_order.layout.height, kv_order.layout.width, kv_order.tiles_w, kv_order.tile_h,
                      kv_order.tile_w, kv_order.num_slots, row_offset, kv_order.window.radius_sq_bound],
                     dtype=torch.int64, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        ext_h, width, tiles_w, tile_h, tile_w, kv_slots, off, r2 = (p[i] for i in range(8))
        qr, qc = _tile_coords(q_idx, tiles_w, tile_h, tile_w)
        kr, kc = _tile_coords(kv_idx, tiles_w, tile_h, tile_w)
        local = (qr + off - kr) * (qr + off - kr) + (qc - kc) * (qc - kc) < r2
        return torch.where(kv_idx < kv_slots, (kr < ext_h) & (kc < width) & local, True)

    return mask_mod


def band_block_mask(q_order: TileOrder, kv_order: TileOrder, row_offset: int, n_rest: int, device=None):
    """The ``BlockMask`` of :func:`band_mask_mod` from tile rectangles (never from a mask):
    every band tile against every tile of the extended band (a band is thin, so this is
    small), then ``n_rest`` text and pooled keys that every image query sees. Forward only."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = q_order.block_size
    kv_len = kv_order.num_slots + n_rest
    n_kt, nk = kv_order.tiles_h * kv_order.tiles_w, -(-kv_len // bs)
    i64 = dict(dtype=torch.int64, device=device)
    q_rect = [x[:, None] for x in _tile_rects(torch.arange(q_order.tiles_h * q_order.tiles_w, **i64), q_order,
                                              row_offset)]
    k_rect = [x[None, :] for x in _tile_rects(torch.arange(n_kt, **i64), kv_order)]
    any_, full = _rect_classes(q_rect, k_rect, kv_order.layout.height, kv_order.layout.width,
                               kv_order.window.radius_sq_bound)
    rest_lo = torch.arange(n_kt, nk, **i64) * bs
    rest_whole = (torch.clamp(rest_lo + bs, max=kv_len) - rest_lo == bs).expand(any_.shape[0], -1)
    full = torch.cat([full, rest_whole], 1)
    partial = torch.cat([any_, torch.ones_like(rest_whole)], 1) & ~full
    cand = torch.arange(nk, **i64).expand(full.shape[0], -1)
    p_num, p_idx = _compact(cand, partial, nk)
    f_num, f_idx = _compact(cand, full, nk)
    return BlockMask.from_kv_blocks(
        p_num[None, None], p_idx[None, None], f_num[None, None], f_idx[None, None], BLOCK_SIZE=bs,
        mask_mod=band_mask_mod(kv_order, row_offset, device),
        seq_lengths=(q_order.num_slots, kv_len), compute_q_blocks=False)


def reference_block_mask(order: TileOrder, device=None):
    """The same structure found by FlexAttention's ``create_block_mask`` (evaluates the
    mask everywhere; for tests and comparison only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(flex_mask_mod(order, device), None, None, order.q_len, order.kv_len,
                             device=device or "cpu", BLOCK_SIZE=order.block_size)
