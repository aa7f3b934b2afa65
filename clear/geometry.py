"""Window geometry: the one place that says which key each query sees.

CLEAR's attention pattern, for a token layout of ``text_len`` text tokens and an
``height x width`` grid of image tokens (plus, with ``down_factor > 1``, the
``(height/df) * (width/df)`` pooled tokens appended after everything else as keys):

* a text query sees every text key and every image key (never the pooled keys);
* an image query sees every text key, every pooled key, and the image keys at grid
  offset (dy, dx) with ``dy**2 + dx**2 < radius**2`` (strict).

Everything that depends on that rule lives here: the dense boolean mask (the oracle
used by the ``dense`` backend and by every test), the exact count of allowed
(query, key) pairs and the FLOPs it implies, the compact tile order of image
tokens, and the analytic block-sparse structure handed to FlexAttention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Window",
    "TokenLayout",
    "BandLayout",
    "TileOrder",
    "grid_from_ids",
    "allowed_mask",
    "count_allowed_pairs",
    "attention_flops",
    "flex_mask_mod",
    "analytic_block_mask",
    "reference_block_mask",
]

@dataclass(frozen=True)
class Window:
    """The attention window: ``radius`` in grid tokens (``None`` = full attention) and
    the pooling factor of the optional down-sampled key/value tokens."""

    radius: float | None
    down_factor: int = 1

    def __post_init__(self):
        if self.radius is not None and not (isinstance(self.radius, (int, float)) and self.radius > 0):
            raise ValueError(f"radius must be a positive number of tokens or None (full attention), got {self.radius!r}")
        if not isinstance(self.down_factor, int) or self.down_factor < 1:
            raise ValueError(f"down_factor must be an integer >= 1, got {self.down_factor!r}")
        if self.radius is None and self.down_factor > 1:
            raise ValueError("down_factor > 1 needs a local window: pass a radius, or use down_factor=1 for full attention")

    @property
    def radius_sq_bound(self) -> int:
        """Smallest integer ``b`` with ``d2 < radius**2  <=>  d2 < b`` for integer ``d2``."""
        return math.ceil(self.radius * self.radius)

    def covers(self, height: int, width: int) -> bool:
        """True when every image key is inside every image query's window."""
        return self.radius is None or (height - 1) ** 2 + (width - 1) ** 2 < self.radius**2

    def masks_anything(self, height: int, width: int) -> bool:
        """False only when every query sees every key: the window covers the grid and there
        are no pooled tokens (which text queries never see)."""
        return self.down_factor > 1 or not self.covers(height, width)


@dataclass(frozen=True)
class TokenLayout:
    """Where text and image tokens sit in one attention call's sequence.

    ``text_first=True`` is FLUX (``[text | image]``); ``False`` is SD3 (``[image | text]``).
    Pooled tokens, when present, are always appended after both as keys only.
    """

    text_len: int
    height: int
    width: int
    text_first: bool = True

    def __post_init__(self):
        if self.text_len < 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"invalid token layout {self}")

    @property
    def num_image(self) -> int:
        return self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.text_len + self.num_image

    @property
    def text_slice(self) -> slice:
        return slice(0, self.text_len) if self.text_first else slice(self.num_image, self.seq_len)

    @property
    def image_slice(self) -> slice:
        return slice(self.text_len, self.seq_len) if self.text_first else slice(0, self.num_image)

    def pooled_grid(self, window: Window) -> tuple[int, int]:
        df = window.down_factor
        if df == 1:
            return 0, 0
        if self.height % df or self.width % df:
            raise ValueError(
                f"the token grid {self.height}x{self.width} is not divisible by down_factor={df}; "
                f"choose an image size whose latent grid (pixels / 16 for FLUX) is a multiple of {df} on both sides"
            )
        return self.height // df, self.width // df

    def num_pooled(self, window: Window) -> int:
        h, w = self.pooled_grid(window)
        return h * w


def grid_from_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    """The (height, width) of the image grid described by FLUX ``img_ids`` (columns 1, 2 =
    row, column), which must enumerate a full rectangle in row-major order (any offset)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[-1] < 3:
        raise ValueError(f"img_ids must have shape [num_tokens, 3], got {tuple(img_ids.shape)}")
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    r0, c0 = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    n = ids.shape[0]
    ar = torch.arange(n, device=ids.device)
    if height * width != n or not (
        torch.equal(rows - r0, ar // width) and torch.equal(cols - c0, ar % width)
    ):
        raise ValueError(
            "CLEAR needs the image tokens to form one rectangular grid in row-major order, but img_ids "
            f"({n} tokens spanning {height}x{width} positions) do not; reference-image tokens (e.g. FLUX Kontext) "
            "are not supported"
        )
    return height, width


# ----------------------------------------------------------------------------------------
# Dense oracle and exact counts
# ----------------------------------------------------------------------------------------


def _local_mask(height: int, width: int, window: Window, device=None) -> torch.Tensor:
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    return d2 < window.radius_sq_bound


def allowed_mask(layout: TokenLayout, window: Window, device=None) -> torch.Tensor:
    """Dense boolean mask ``[queries, keys]`` in the layout's natural token order, keys
    followed by the pooled tokens. ``True`` = the query sees the key."""
    n_pool = layout.num_pooled(window)
    mask = torch.ones(layout.seq_len, layout.seq_len + n_pool, dtype=torch.bool, device=device)
    img, txt = layout.image_slice, layout.text_slice
    if window.radius is not None:
        mask[img, img] = _local_mask(layout.height, layout.width, window, device)
    mask[txt, layout.seq_len :] = False
    return mask


def _local_pairs(height: int, width: int, radius: float) -> int:
    """Exact number of (query, key) image pairs with dy^2 + dx^2 < r^2 inside the grid.

    The sum over queries separates: for a row offset dy, ``height - |dy|`` query rows
    have a partner row, and for each allowed dx, ``width - |dx|`` columns do."""
    bound = Window(radius).radius_sq_bound
    total = 0
    for dy in range(-(height - 1), height):
        rem = bound - 1 - dy * dy  # largest allowed dx^2
        if rem < 0:
            continue
        m = min(math.isqrt(rem), width - 1)
        row_pairs = width + 2 * (m * width - m * (m + 1) // 2)  # sum over |dx| <= m of (width - |dx|)
        total += (height - abs(dy)) * row_pairs
    return total


def count_allowed_pairs(layout: TokenLayout, window: Window) -> int:
    """Number of allowed (query, key) pairs of one attention call, computed in closed form."""
    t, n = layout.text_len, layout.num_image
    if window.radius is None:
        return (t + n) ** 2
    local = _local_pairs(layout.height, layout.width, window.radius)
    return t * (t + n) + n * t + local + n * layout.num_pooled(window)


def attention_flops(height: int, width: int, radius: float | None, text_len: int = 512,
                    down_factor: int = 1, dim: int = 3072) -> int:
    """The paper's per-layer attention cost ``4 * sum(M) * c``: ``sum(M)`` allowed
    (query, key) pairs, ``c`` = ``dim`` channels (heads x head_dim), 2 FLOPs per
    multiply-add in ``QK^T`` and in ``PV``. ``height``/``width`` are in tokens (latent / 2
    for FLUX, i.e. pixels / 16). ``radius=None`` is full attention."""
    layout = TokenLayout(text_len, height, width)
    return 4 * count_allowed_pairs(layout, Window(radius, down_factor)) * dim


# ----------------------------------------------------------------------------------------
# Tile order and block-sparse structure for FlexAttention
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# A band of rows (patch parallelism): its image queries against the band plus halo rows
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandLayout:
    """One patch-parallel attention call for the image queries of a band of ``rows x width``
    tokens: its keys are ``[text | extended band | pooled]``, the extended band being ``above``
    halo rows, the band, and ``below`` halo rows (row-major), ``n_pooled`` pooled tokens last."""

    text_len: int
    rows: int
    width: int
    above: int = 0
    below: int = 0
    n_pooled: int = 0

    def __post_init__(self):
        if min(self.text_len, self.above, self.below, self.n_pooled) < 0 or self.rows < 1 or self.width < 1:
            raise ValueError(f"invalid band layout {self}")

    @property
    def ext_rows(self) -> int:
        return self.above + self.rows + self.below

    @property
    def num_queries(self) -> int:
        return self.rows * self.width

    @property
    def num_keys(self) -> int:
        return self.text_len + self.ext_rows * self.width + self.n_pooled



def band_allowed_mask(rows: int, width: int, row_offset: int, ext_rows: int, window: Window, text_len: int = 0,
                      n_pooled: int = 0, device=None) -> torch.Tensor:
    """Dense mask of a band's ``rows x width`` image queries (row-major) against
    ``[text | extended band (ext_rows x width, row-major) | pooled]`` keys; query row ``i``
    is row ``i + row_offset`` of the extended band. Image queries see all text and pooled keys."""
    q_rows = torch.arange(rows, device=device).repeat_interleave(width) + row_offset
    q_cols = torch.arange(width, device=device).repeat(rows)
    k_rows = torch.arange(ext_rows, device=device).repeat_interleave(width)
    k_cols = torch.arange(width, device=device).repeat(ext_rows)
    mask = torch.ones(rows * width, text_len + ext_rows * width + n_pooled, dtype=torch.bool, device=device)
    mask[:, text_len : text_len + ext_rows * width] = (
        (q_rows[:, None] - k_rows) ** 2 + (q_cols[:, None] - k_cols) ** 2 < window.radius_sq_bound)
    return mask


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
