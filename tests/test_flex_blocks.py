"""FlexAttention's tiling (clear.backends.flex_blocks): the tile order's round trip, the mask_mod read back in
natural order equals the dense oracle, and the analytic block structure equals FlexAttention's own."""

import itertools
import math
import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from clear.backends.flex_blocks import TileOrder, analytic_block_mask, flex_mask_mod, reference_block_mask
from clear.geometry import TokenLayout, Window, allowed_mask


def _flex_to_natural(order: TileOrder):
    lay = order.layout
    q = torch.cat([order.num_slots + torch.arange(lay.text_len), order.slot_of_token()])
    k = torch.cat([q, order.q_len + torch.arange(lay.num_pooled(order.window))])
    return q, k


FULL_SWEEP = [c for c in itertools.product([6, 9, 16], [10, 5, 16], [0, 3, 20], [1, 3, 2.5, 40], [1, 2],
                                           [(2, 4), (4, 4)])
              if not (c[4] > 1 and (c[0] % c[4] or c[1] % c[4]))]


def covering_sample(cases, seed=0):
    """A few cases that together take every value of every parameter, and every (radius, df, tile) triple
    (the ones that change which blocks are partial, full or skipped): the sweep's distinct behaviours in a
    fraction of its time."""
    rng = random.Random(seed)
    cases = list(cases)
    rng.shuffle(cases)
    chosen, seen_values, seen_triples = [], set(), set()
    for c in cases:
        values = {(i, v) for i, v in enumerate(c)}
        triple = (c[3], c[4], c[5])
        if not values <= seen_values or triple not in seen_triples:
            chosen.append(c)
            seen_values |= values
            seen_triples.add(triple)
    return chosen


SWEEP = covering_sample(FULL_SWEEP)


@pytest.mark.parametrize("height,width,text_len,radius,df,tile", SWEEP)
def test_flex_mask_mod_and_analytic_block_mask(height, width, text_len, radius, df, tile):
    order = TileOrder(TokenLayout(text_len, height, width), Window(radius, df), *tile)
    # slots are a permutation into the padded tile sequence
    slots = order.slot_of_token()
    assert slots.unique().numel() == height * width and int(slots.max()) < order.num_slots
    to_flex, from_flex = order.gather_indices()
    assert torch.equal(to_flex[from_flex], torch.arange(order.layout.seq_len))  # a round trip
    # mask_mod, read back in natural order, is the dense oracle
    flex_mask = create_mask(flex_mask_mod(order), 1, 1, order.q_len, order.kv_len, device="cpu")[0, 0]
    q, k = _flex_to_natural(order)
    assert torch.equal(flex_mask[q][:, k], allowed_mask(order.layout, order.window))
    # analytic block structure == FlexAttention's own create_block_mask, partial and full separately
    a, b = analytic_block_mask(order), reference_block_mask(order)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert torch.equal(a.full_kv_num_blocks, b.full_kv_num_blocks)
    assert torch.equal(a.to_dense(), b.to_dense())
    for x, y in [(a.kv_indices, b.kv_indices), (a.full_kv_indices, b.full_kv_indices)]:
        for row in range(x.shape[2]):
            n = int(a.kv_num_blocks[0, 0, row]) if x is a.kv_indices else int(a.full_kv_num_blocks[0, 0, row])
            assert torch.equal(x[0, 0, row, :n].sort().values, y[0, 0, row, :n].sort().values)


def test_block_sparsity_at_real_size():
    """At 2K (128x128 tokens) with r=16 and 8x16 tiles: under a fifth of all block pairs are visited, and the
    text blocks of every image tile plus the tile pairs deep inside the circle are full (no mask evaluation)."""
    order = TileOrder(TokenLayout(512, 128, 128), Window(16))
    bm = analytic_block_mask(order)
    partial, full = bm.kv_num_blocks.sum().item(), bm.full_kv_num_blocks.sum().item()
    n_blocks = math.ceil(order.q_len / 128) * math.ceil(order.kv_len / 128)
    assert (partial + full) / n_blocks < 0.2
    n_tiles = 16 * 8
    assert full > n_tiles * 4  # 512 text keys = 4 full blocks per image tile, plus interior tile pairs
    assert partial > 0
