"""Compiled FlexAttention (the path that really skips blocks) against the dense oracle, on CPU."""

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from clear.attention import ClearAttention, pool_tokens
from clear.geometry import TokenLayout


@pytest.mark.slow
def test_compiled_flex_with_analytic_block_mask_equals_dense():
    compiled = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for (text, h, w, r, df) in [(40, 24, 40, 5, 1), (13, 16, 20, 3, 4)]:
        layout = TokenLayout(text, h, w)
        core = ClearAttention(r, df, backend="flex", tile=(8, 16))
        q, k, v = (torch.randn(2, layout.seq_len, 2, 16, generator=g) for _ in range(3))
        sw = torch.rand(1, 1, 1, df, 1, df, 1, generator=g) if df > 1 else None
        plan = core.plan(layout, torch.device("cpu"))
        # the kernel really reads the block structure: run the compiled kernel on the plan's tensors
        qf, kf, vf = (x.index_select(1, plan.to_flex) for x in (q, k, v))
        if df > 1:
            kf = torch.cat([kf, pool_tokens(k[:, text:], h, w, sw)], 1)
            vf = torch.cat([vf, pool_tokens(v[:, text:], h, w, sw)], 1)
        out = compiled(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), block_mask=plan.block_mask)
        got = out.transpose(1, 2).index_select(1, plan.from_flex)
        dense = ClearAttention(r, df, backend="dense")(q, k, v, layout, sw)
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
        # and a block mask that drops the partial blocks gives a different answer: blocks are not ignored
        bm = plan.block_mask
        from torch.nn.attention.flex_attention import BlockMask

        no_partial = BlockMask.from_kv_blocks(torch.zeros_like(bm.kv_num_blocks), bm.kv_indices,
                                              bm.full_kv_num_blocks, bm.full_kv_indices,
                                              BLOCK_SIZE=128, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)
        wrong = compiled(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), block_mask=no_partial)
        assert not torch.allclose(wrong.transpose(1, 2).index_select(1, plan.from_flex), dense, atol=1e-3)


def test_compiled_flex_calls_get_a_higher_recompile_limit():
    """Past dynamo's default recompile limit the static-shape kernel would silently run eagerly (materialising every
    score); CLEAR's calls raise the limit for themselves only."""
    import torch._dynamo.config as dynamo_config

    from clear.backends.flex import FLEX_RECOMPILE_LIMIT, _with_recompile_limit

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo_config, name)
    seen = _with_recompile_limit(lambda: getattr(dynamo_config, name))()
    assert seen == max(FLEX_RECOMPILE_LIMIT, before) > 8
    assert getattr(dynamo_config, name) == before  # torch's global setting is untouched
