"""The tiled and flex backends on video layouts (frames x height x width) against the dense oracle: outputs,
log-sum-exp, every query tile, text and pooled keys; flex's analytic block mask against FlexAttention's own."""

import pytest
import torch

from clear.backends import Options, dense, flex, tiled
from clear.backends.flex_video import VideoTileOrder, video_mask_mod
from clear.geometry import TokenLayout, Window

CASES = [  # (frames, height, width), radius, temporal radius, text tokens, down factor
    ((5, 7, 9), 3, 2, 0, 1),
    ((5, 7, 9), 2.5, None, 0, 1),
    ((5, 7, 9), 3, 0.5, 0, 1),  # each frame alone
    ((4, 5, 6), 1.5, 3.5, 3, 1),  # text tokens
    ((3, 4, 6), 1.5, 1.5, 0, 2),  # pooled keys, per frame
    ((6, 3, 5), 100, 100, 2, 1),  # the window covers the grid
    ((7, 9, 11), 2, 2.5, 0, 1),
    ((4, 16, 20), 3, 1.5, 0, 2),  # 320 pooled keys: their own call (split), the window box larger
    ((4, 16, 20), 1.5, 0.5, 0, 2),  # the split with more pooled keys than the box holds
]


def oracle(layout, window, q, k, v, scale, return_lse=False):
    return dense.attend(q, k, v, scale, return_lse=return_lse, mask=dense.allowed_mask(layout, window))


def qkv(layout, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, p = layout.seq_len, layout.num_pooled(window)
    return (torch.randn(2, s, 2, 8, generator=g), torch.randn(2, s + p, 2, 8, generator=g),
            torch.randn(2, s + p, 2, 8, generator=g))


# every case with the default tile and one other; every tile shape on the odd grid
TILED = ([(c, None) for c in CASES] + [(c, (2, 3, 4)) for c in CASES[:7]]
         + [(CASES[0], t) for t in ((1, 2, 2), (3, 8, 8))])


@pytest.mark.parametrize("case,query_tile", TILED)
def test_tiled_video_equals_dense(case, query_tile):
    grid, r, rt, text, df = case
    layout, window = TokenLayout(text, grid[1], grid[2], frames=grid[0]), Window(r, df, rt)
    q, k, v = qkv(layout, window)
    plan = tiled.grid_plan(layout, window, "cpu", Options(query_tile=query_tile))
    torch.testing.assert_close(plan.attend(q, k, v, 0.3), oracle(layout, window, q, k, v, 0.3), atol=2e-6, rtol=1e-5)
    assert (plan.explicit is not None) == (layout.num_pooled(window) >= 256)
    out, lse = plan.attend(q, k, v, 0.3, return_lse=True)
    ref_out, ref_lse = oracle(layout, window, q, k, v, 0.3, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("grid,r,rt,text,df", [CASES[0], CASES[4], CASES[-2], CASES[-1]])
def test_tiled_video_gradients_equal_dense(grid, r, rt, text, df):
    layout, window = TokenLayout(text, grid[1], grid[2], frames=grid[0]), Window(r, df, rt)
    q, k, v = (x.requires_grad_(True) for x in qkv(layout, window))
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    plan = tiled.grid_plan(layout, window, "cpu")
    got = torch.autograd.grad((plan.attend(q, k, v, 0.3) * g).sum(), (q, k, v))
    want = torch.autograd.grad((oracle(layout, window, q, k, v, 0.3) * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_tiled_video_plan_holds_no_mask_and_few_classes():
    """720p, 81 frames, r=16 over every frame: the masks would be gigabytes; the plan keeps their factors only."""
    layout, window = TokenLayout(0, 45, 80, frames=21), Window(16)
    plan = tiled.grid_plan(layout, window, "cpu")
    stored = sum(t.numel() * t.element_size() for g in plan.groups for t in vars(g).values()
                 if isinstance(t, torch.Tensor) and t is not g.kv_idx and t is not g.q_idx)
    assert stored < 2**20 and len(plan.groups) <= 6 * 3 * 3  # classes: frames 6 (every tile start), rows 3, cols 3
    assert plan.tile == (4, 16, 16)
    assert sum(g.q_idx.numel() for g in plan.groups) >= layout.num_image


@pytest.mark.parametrize("case,tile", [(c, (2, 4)) for c in CASES] + [(c, (3, 3)) for c in CASES[:3]]
                         + [(CASES[0], (8, 16))])
def test_flex_video_equals_dense_and_its_block_mask_is_flex_own(case, tile):
    grid, r, rt, text, df = case
    from torch.nn.attention.flex_attention import create_block_mask

    layout, window = TokenLayout(text, grid[1], grid[2], frames=grid[0]), Window(r, df, rt)
    q, k, v = qkv(layout, window)
    plan = flex.grid_plan(layout, window, "cpu", Options(tile=tile))
    torch.testing.assert_close(plan.attend(q, k, v, 0.3), oracle(layout, window, q, k, v, 0.3), atol=2e-6, rtol=1e-5)
    order = VideoTileOrder(layout, window, *tile)
    own = create_block_mask(video_mask_mod(order), None, None, order.q_len, order.kv_len, device="cpu",
                            BLOCK_SIZE=order.block_size)
    assert torch.equal(plan.block_mask.to_dense(), own.to_dense())
    assert torch.equal(plan.block_mask.full_kv_num_blocks, own.full_kv_num_blocks)


@pytest.mark.slow
def test_compiled_flex_video_kernel_equals_dense():
    """The compiled FlexAttention kernel (inductor on CPU; CUDA runs it by default) with the 3-D mask_mod."""
    layout, window = TokenLayout(0, 7, 9, frames=5), Window(3, 1, 2)
    q, k, v = qkv(layout, window)
    plan = flex.grid_plan(layout, window, "cpu", Options(tile=(4, 8), compiled=True))
    torch.testing.assert_close(plan.attend(q, k, v, 0.3), oracle(layout, window, q, k, v, 0.3), atol=2e-6, rtol=1e-5)
