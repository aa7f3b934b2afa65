"""The attention backends (clear.backends), parametrized over the registry.

Every registered backend equals the dense oracle and diffusers' own attention given the
explicit mask of clear.geometry, over a random sweep of grids, radii, down factors, text
lengths and tiles, for whole-grid plans and for patch-parallel band plans, with and without
the log-sum-exp (checked against torch.logsumexp of explicit logits). Then the registry's
facts (choices, where each backend runs, the auto rule), and a third backend added by one
file and one line in the table, run through ClearAttention, apply_clear and the patch-parallel
attention."""

from __future__ import annotations

import dataclasses
import math
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

import clear
from clear import backends
from clear.attention import ClearAttention
from clear.backends import Call, Options, tiled
from clear.geometry import BandLayout, TokenLayout, Window, allowed_mask
from tiny_models import flux_inputs, tiny_flux

CPU = torch.device("cpu")
TILES = [(2, 4), (4, 4), (8, 16), (3, 5)]


def _grid_cases(n: int, seed: int) -> list[tuple]:
    """(text_len, height, width, radius, down_factor, text_first, tile, batch): random grids whose sides the down
    factor divides, radii from under one token to over the grid."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        df = rng.choice([1, 1, 2, 3])
        h, w = df * rng.randint(1, 12 // df + 1), df * rng.randint(1, 14 // df + 1)
        radius = rng.choice([0.5, 1, 1.5, 2, 2.5, 3, 4.2, 6, 20])
        cases.append((rng.choice([0, 1, 5, 13]), h, w, radius, df, rng.random() < 0.7, rng.choice(TILES),
                      rng.randint(1, 2)))
    return cases


# Cases a random sweep may miss: a huge radius with text last, a tiny one with df 3, square and not.
EDGE_GRIDS = [(5, 7, 9, 20, 1, False, (4, 4), 2), (4, 6, 6, 0.5, 3, False, (4, 4), 2),
              (2, 4, 6, 20, 2, False, (2, 4), 2), (6, 9, 6, 1.5, 3, True, (3, 5), 2)]
GRIDS = _grid_cases(14, seed=12) + EDGE_GRIDS

# Every backend, and the tiled backend's ways with the keys every image query shares (text, pooled): gathered
# into every tile, or their own call merged by log-sum-exp (tiled.split_for; forced here whatever the number of
# shared keys): "fused", both parts in SDPA's CPU kernel (with its backward); "shared" and "window", the
# differentiable merge with explicit logits for the shared or the window part (what runs off CPU).
SPLITS = ["fused", "shared", "window"]
VARIANTS = [(name, None) for name in backends.names()] + [("tiled", split) for split in SPLITS]
VARIANT_IDS = [name if split is None else f"{name}-split-{split}" for name, split in VARIANTS]


def _use_variant(monkeypatch, name: str, split: str | None):
    """Force the tiled backend's way with the shared keys (``None``: gathered into every tile)."""
    if name != "tiled":
        return
    monkeypatch.setattr(tiled, "SPLIT_FROM", math.inf if split is None else 1)
    monkeypatch.setattr(tiled, "EXPLICIT_WINDOW_ABOVE", 0.0 if split == "window" else math.inf)
    if split in ("shared", "window"):  # without the CPU kernel's log-sum-exp: the differentiable merge
        monkeypatch.setattr(tiled, "FUSED_WITH_LSE", None)


def _check_variant(plan, split: str | None, n_shared: int):
    """The plan runs the forced way (no shared keys: nothing to split)."""
    if plan.backend == "tiled":
        assert plan.explicit == ({"fused": "shared"}.get(split, split) if n_shared else None)
        assert (plan.shared is None) == (plan.explicit is None)


def _qkv(n_q: int, n_k: int, batch: int = 2, heads: int = 3, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n_q, heads, dim, generator=g), torch.randn(batch, n_k, heads, dim, generator=g),
            torch.randn(batch, n_k, heads, dim, generator=g))


def _oracle(q, k, v, mask, scale):
    """diffusers' own attention with the explicit boolean mask ``[Sq, Sk]``, and the log-sum-exp of the masked
    logits (float64, then float32)."""
    out = dispatch_attention_fn(q, k, v, attn_mask=None if mask is None else mask[None, None], scale=scale)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return out, logits.logsumexp(-1).transpose(1, 2).float()


def _grid_mask(layout: TokenLayout, window: Window) -> torch.Tensor:
    """Keys ``[natural order | pooled]``: clear.geometry's mask (the oracle's, full even where dense plans none)."""
    return allowed_mask(layout, window)


@pytest.mark.parametrize("name,split", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case", GRIDS, ids=[f"t{c[0]}{'' if c[5] else 'last'}_{c[1]}x{c[2]}_r{c[3]}_df{c[4]}_b{c[7]}"
                                             for c in GRIDS])
def test_grid_plan_equals_oracle(name, split, case, monkeypatch):
    text, h, w, radius, df, text_first, tile, batch = case
    _use_variant(monkeypatch, name, split)
    layout, window = TokenLayout(text, h, w, text_first), Window(radius, df)
    n_k = layout.seq_len + layout.num_pooled(window)
    q, k, v = _qkv(layout.seq_len, n_k, batch, seed=h * w + text)
    scale = 0.3 + radius / 10
    plan = backends.get(name).grid_plan(layout, window, CPU, Options(tile=tile, query_tile=tile))
    assert plan.backend == name and plan.layout == layout
    _check_variant(plan, split, text + layout.num_pooled(window))
    ref, ref_lse = _oracle(q, k, v, _grid_mask(layout, window), scale)
    dense = backends.get("dense").grid_plan(layout, window, CPU).attend(q, k, v, scale)
    out = plan.attend(q, k, v, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    out, lse = plan.attend(q, k, v, scale, return_lse=True)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (batch, layout.seq_len, 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    if backends.get(name).runs_on("cpu", with_grad=True):  # gradients of q, k, v equal diffusers' attention's
        plan = backends.get(name).grid_plan(layout, window, CPU, Options(tile=tile, query_tile=tile), with_grad=True)
        _assert_same_grads(plan, q, k, v, _grid_mask(layout, window), scale)


def _assert_same_grads(plan, q, k, v, mask, scale):
    """The outputs and the gradients of ``q, k, v`` through ``plan.attend`` with inputs that require grad equal
    those through diffusers' attention with the explicit ``mask``: of the output, and of the output and the
    log-sum-exp together (``return_lse``)."""
    g = torch.Generator().manual_seed(11)
    grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], generator=g)
    grad_lse = torch.randn(q.shape[:-1], generator=g)
    for return_lse in (False, True):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = _oracle(*inputs, mask, scale)
        loss = (out * grad_out).sum() + (lse * grad_lse).sum() * return_lse
        want = torch.autograd.grad(loss, inputs)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        if return_lse:
            got_out, got_lse = plan.attend(*inputs, scale, return_lse=True)
            torch.testing.assert_close(got_lse, lse.detach(), atol=1e-5, rtol=1e-5)
        else:
            got_out, got_lse = plan.attend(*inputs, scale), 0
        torch.testing.assert_close(got_out, out.detach(), atol=1e-5, rtol=1e-5)  # the differentiable path's outputs
        loss = (got_out * grad_out).sum() + (got_lse * grad_lse).sum()
        for got, ref in zip(torch.autograd.grad(loss, inputs), want):  # float32 round-off grows with the gradient
            torch.testing.assert_close(got, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-5)


def _band_cases(n: int, seed: int) -> list[tuple]:
    """(grid case, band start, band rows): a band of a random grid, with text first (FLUX)."""
    rng = random.Random(seed)
    out = []
    for text, h, w, radius, df, _, tile, batch in _grid_cases(n, seed):
        rows = df * rng.randint(1, h // df)
        start = df * rng.randint(0, (h - rows) // df)
        out.append(((text, h, w, radius, df, True, tile, batch), start, rows))
    return out


# with the edge cases: a huge radius with df 3, a band inside a df 2 grid, a tiny radius
BANDS = _band_cases(12, seed=7) + [((5, 9, 6, 20, 3, True, (4, 4), 2), 3, 3),
                                   ((4, 8, 10, 1.5, 2, True, (3, 5), 2), 2, 4),
                                   ((3, 6, 6, 0.5, 3, True, (2, 4), 1), 0, 3)]


@pytest.mark.parametrize("name,split", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case,start,rows", BANDS, ids=[f"t{c[0]}_{c[1]}x{c[2]}_r{c[3]}_df{c[4]}_rows{s}+{n}"
                                                       for c, s, n in BANDS])
def test_band_plan_equals_the_grid_oracle_rows(name, split, case, start, rows, monkeypatch):
    """A band's image queries against [text | band with its halo rows | pooled] equal the same queries of the whole
    grid (diffusers' attention with clear.geometry's grid mask): the halo holds every key the window reaches."""
    text, h, w, radius, df, _, tile, batch = case
    _use_variant(monkeypatch, name, split)
    layout, window = TokenLayout(text, h, w), Window(radius, df)
    halo = math.isqrt(window.radius_sq_bound - 1)
    above, below = min(start, halo), min(h - start - rows, halo)
    n_pooled = layout.num_pooled(window)
    q, k, v = _qkv(layout.seq_len, layout.seq_len + n_pooled, batch, seed=start + 10 * rows)
    scale = 0.25 + radius / 8
    ref, ref_lse = _oracle(q, k, v, _grid_mask(layout, window), scale)
    queries = slice(text + start * w, text + (start + rows) * w)
    keys = torch.cat([torch.arange(text), torch.arange(text + (start - above) * w, text + (start + rows + below) * w),
                      torch.arange(layout.seq_len, layout.seq_len + n_pooled)])
    band = BandLayout(text, rows, w, above, below, n_pooled)
    assert len(keys) == band.num_keys
    plan = backends.get(name).band_plan(band, window, CPU, Options(tile=tile, query_tile=tile))
    assert plan.backend == name and plan.layout == band
    _check_variant(plan, split, text + n_pooled)
    qb, kb, vb = q[:, queries], k[:, keys], v[:, keys]
    torch.testing.assert_close(plan.attend(qb, kb, vb, scale), ref[:, queries], atol=1e-5, rtol=1e-5)
    dense = backends.get("dense").band_plan(band, window, CPU).attend(qb, kb, vb, scale)
    torch.testing.assert_close(plan.attend(qb, kb, vb, scale), dense, atol=1e-5, rtol=1e-5)
    out, lse = plan.attend(qb, kb, vb, scale, return_lse=True)
    torch.testing.assert_close(out, ref[:, queries], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse[:, queries], atol=1e-5, rtol=1e-5)
    if backends.get(name).runs_on("cpu", with_grad=True):
        mask = backends.get("dense").band_plan(band, window, CPU).mask
        _assert_same_grads(plan, qb, kb, vb, mask, scale)


@pytest.mark.parametrize("name", backends.names())
@pytest.mark.parametrize("n_q,n_k", [(7, 30), (1, 1), (13, 200)])
def test_unmasked_attend_with_lse(name, n_q, n_k):
    """The text queries of patch parallelism: every key, and the log-sum-exp for the exact merge."""
    q, k, v = _qkv(n_q, n_k, seed=n_k)
    ref, ref_lse = _oracle(q, k, v, None, 0.4)
    torch.testing.assert_close(backends.get(name).attend(q, k, v, 0.4), ref, atol=1e-5, rtol=1e-5)
    out, lse = backends.get(name).attend(q, k, v, 0.4, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_dense_lse_takes_heads_in_chunks():
    """The explicit-logits path bounds its memory by taking a few heads at a time; chunks change nothing."""
    from clear.backends import dense

    q, k, v = _qkv(9, 40, heads=5)
    mask = torch.rand(9, 40, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[:, 0] = True
    whole = dense.attend(q, k, v, 0.5, return_lse=True, mask=mask)
    chunked = dense.attend(q, k, v, 0.5, return_lse=True, mask=mask, max_logits=2 * 9 * 40 * 2)  # 2 heads a chunk
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole[1], _oracle(q, k, v, mask, 0.5)[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", [None, *SPLITS], ids=str)
@pytest.mark.parametrize("text", [0, 3])
def test_tiled_padding_queries_never_poison_gradients(text, split, monkeypatch):
    """A grid that is no multiple of the tile pads its border tiles with queries that repeat a real token; with a
    radius under one token and no text such a padding row would see no key at all (a kernel may answer NaN for
    it); the plan lets padding rows see the valid keys. Outputs and gradients stay finite and equal the oracle's."""
    _use_variant(monkeypatch, "tiled", split)
    layout, window = TokenLayout(text, 5, 7), Window(0.5)
    q, k, v = (t.requires_grad_() for t in _qkv(layout.seq_len, layout.seq_len, seed=5))
    plan = backends.get("tiled").grid_plan(layout, window, CPU, Options(query_tile=(4, 4)))
    _check_variant(plan, split, text)
    out = plan.attend(q, k, v, 0.3)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = backends.get("dense").grid_plan(layout, window, CPU).attend(q, k, v, 0.3)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", [None, *SPLITS], ids=str)
def test_tiled_runs_many_tiles_in_chunks_and_chunks_change_nothing(split, monkeypatch):
    """The tiled backend bounds its gathered keys by taking tiles in chunks (long text x many tiles at high
    resolution) and its explicit logits by taking tiles or queries in chunks; interior tiles share one mask,
    border tiles carry their own. Chunks change nothing, with or without the shared keys split off."""
    _use_variant(monkeypatch, "tiled", split)
    layout, window = TokenLayout(5, 14, 12), Window(2.5, 2)
    n_k = layout.seq_len + layout.num_pooled(window)
    q, k, v = _qkv(layout.seq_len, n_k, seed=3)
    plan = backends.get("tiled").grid_plan(layout, window, CPU, Options(query_tile=(4, 4)))
    _check_variant(plan, split, 5 + 42)
    interior, border = plan.groups
    assert interior.bias.shape[0] == 1 and border.bias.shape[0] == border.q_idx.shape[0]
    assert interior.q_idx.shape[0] + border.q_idx.shape[0] == 4 * 3  # ceil(14/4) x ceil(12/4) tiles
    whole, (whole_out, whole_lse) = plan.attend(q, k, v, 0.3), plan.attend(q, k, v, 0.3, return_lse=True)
    monkeypatch.setattr(tiled, "MAX_GATHERED", 2 * 3 * 9 * (interior.kv_idx.shape[1] + 1))  # a tile or two a chunk
    monkeypatch.setattr(tiled, "MAX_LOGITS", 2 * 3 * 16 * (interior.kv_idx.shape[1] + 1))  # a tile's logits
    torch.testing.assert_close(plan.attend(q, k, v, 0.3), whole, atol=1e-6, rtol=1e-6)
    for got, want in zip(plan.attend(q, k, v, 0.3, return_lse=True), (whole_out, whole_lse)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    dense = backends.get("dense").grid_plan(layout, window, CPU).attend(q, k, v, 0.3)
    torch.testing.assert_close(whole, dense, atol=1e-5, rtol=1e-5)


def test_tiled_splits_the_shared_keys_off_for_flux_and_the_pooled_mini():
    """With the shipped thresholds: FLUX-shaped calls (512 text keys, r = 16) and the mini model with pooled keys
    (df = 2 at 128 x 128 tokens: 32 + 4096 shared keys) run the shared keys as their own call, so no tile holds a
    copy of them; the mini model with df = 1 (32 text keys) gathers them into its tiles."""
    cases = [(TokenLayout(512, 64, 64), Window(16), "shared", (16, 16), 46 * 46),
             (TokenLayout(512, 96, 96), Window(16), "shared", (16, 16), 46 * 46),
             (TokenLayout(32, 128, 128), Window(4, 2), "window", (8, 8), 14 * 14),
             (TokenLayout(32, 128, 128), Window(4), None, (8, 8), 14 * 14 + 32)]
    for layout, window, explicit, tile, keys in cases:
        plan = backends.get("tiled").grid_plan(layout, window, CPU)
        assert (plan.explicit, plan.tile) == (explicit, tile)
        assert all(g.kv_idx.shape[1] == keys for g in plan.groups)  # the box (and the gathered text), nothing else
        assert all(g.bias.shape[-1] == keys + (explicit == "shared") for g in plan.groups)  # + the extra key


@pytest.mark.parametrize("text,h,w,radius,df,text_first,explicit", [(260, 10, 10, 6, 1, False, "shared"),
                                                                    (8, 32, 32, 2, 2, True, "window")])
def test_tiled_split_with_the_shipped_thresholds_equals_oracle(text, h, w, radius, df, text_first, explicit):
    """Calls past :data:`tiled.SPLIT_FROM` shared keys split them off without any forcing; outputs and gradients
    equal diffusers' attention with the explicit mask."""
    layout, window = TokenLayout(text, h, w, text_first), Window(radius, df)
    q, k, v = _qkv(layout.seq_len, layout.seq_len + layout.num_pooled(window), batch=1, heads=2, seed=text)
    plan = backends.get("tiled").grid_plan(layout, window, CPU, with_grad=True)
    assert plan.explicit == explicit
    torch.testing.assert_close(plan.attend(q, k, v, 0.35), _oracle(q, k, v, _grid_mask(layout, window), 0.35)[0],
                               atol=1e-5, rtol=1e-5)
    _assert_same_grads(plan, q, k, v, _grid_mask(layout, window), 0.35)


@pytest.mark.parametrize("split", SPLITS)
def test_tiled_split_merge_is_stable_and_keeps_low_precision(split, monkeypatch):
    """The merge by log-sum-exp holds where one part's logits dwarf the other's (hundreds apart: e^lse overflows
    float32), and in bfloat16 and float16 the split stays about as close to float64 attention as the dense
    backend in the same dtype: the differentiable merge within 1.25x its error (the extra key's logit rides in a
    high and a low part; one channel gives 1.4x in float16), the fused kernels' within 2x (each part's output
    is rounded to the dtype before the merge)."""
    _use_variant(monkeypatch, "tiled", split)
    layout, window = TokenLayout(6, 8, 8, text_first=False), Window(2.5, 2)
    n_k = layout.seq_len + layout.num_pooled(window)
    q, k, v = _qkv(layout.seq_len, n_k, batch=2, heads=2, dim=16, seed=4)
    k[:, layout.text_slice] *= 40  # text logits far above or below the window's, by query
    plan = backends.get("tiled").grid_plan(layout, window, CPU, Options(query_tile=(4, 4)))
    dense = backends.get("dense").grid_plan(layout, window, CPU)
    ref = dense.attend(q.double(), k.double(), v.double(), 2.0)
    torch.testing.assert_close(plan.attend(q, k, v, 2.0), ref.float(), atol=1e-5, rtol=1e-5)
    for got, want in zip(plan.attend(q, k, v, 2.0, return_lse=True), dense.attend(q, k, v, 2.0, return_lse=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    k[:, layout.text_slice] /= 40
    q *= 3  # logits of tens: a single bfloat16 channel would round the extra key's logit by ~0.1
    ref = dense.attend(q.double(), k.double(), v.double(), 0.5)
    for dtype in (torch.bfloat16, torch.float16):
        lo = [t.to(dtype) for t in (q, k, v)]
        err = (plan.attend(*lo, 0.5).double() - ref).abs().max().item()
        dense_err = (dense.attend(*lo, 0.5).double() - ref).abs().max().item()
        assert err <= (2.0 if split == "fused" else 1.25) * dense_err, (dtype, err, dense_err)


@pytest.mark.parametrize("split", SPLITS)
def test_tiled_split_traces_whole(split, monkeypatch):
    """The split paths trace as one graph under torch.compile(fullgraph=True) (AOT autograd: the forward without a
    backward, and forward and backward), and the compiled calls equal the eager ones."""
    _use_variant(monkeypatch, "tiled", split)
    layout, window = TokenLayout(4, 6, 8), Window(1.5, 2)
    q, k, v = _qkv(layout.seq_len, layout.seq_len + layout.num_pooled(window), seed=9)
    plan = backends.get("tiled").grid_plan(layout, window, CPU, Options(query_tile=(4, 4)), with_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(plan.attend, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, 0.3), plan.attend(q, k, v, 0.3), atol=1e-6, rtol=1e-6)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*inputs, 0.3)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    torch._dynamo.reset()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = plan.attend(*inputs, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", ["fused", "window"])
def test_tiled_split_in_a_flux_model_equals_dense(split, monkeypatch):
    """A whole tiny FLUX model with pooled keys through apply_clear: the tiled backend with the shared keys split
    off equals the dense backend in inference and in a training step (the gradients of every parameter)."""
    _use_variant(monkeypatch, "tiled", split)
    calls = {"merged": 0, "extra key": 0}  # which merge ran: the fused kernels' or the differentiable one
    for fn, what in ((tiled._merge, "merged"), (tiled._sink_logit, "extra key")):
        def counted(*args, _fn=fn, _what=what):
            calls[_what] += 1
            return _fn(*args)
        monkeypatch.setattr(tiled, fn.__name__, counted)
    x = flux_inputs(4, 6, batch=1)
    results = {}
    for backend in ("dense", "tiled"):
        model = tiny_flux()
        clear.apply_clear(model, radius=2.5, down_factor=2, backend=backend)
        with torch.no_grad():
            out = model(**x).sample
        model.train()
        model(**x).sample.square().mean().backward()
        results[backend] = out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (out, grads), (ref, ref_grads) = results["tiled"], results["dense"]
    assert (calls["merged"] > 0, calls["extra key"] > 0) == ((True, False) if split == "fused" else (False, True))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5 * max(1.0, ref_grads[name].abs().max().item()),
                                   rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------


def test_registry_facts():
    assert backends.choices() == ("auto", "dense", "flex", "tiled")
    assert backends.names() == ("dense", "flex", "tiled") and backends.REFERENCE == "dense"
    tiled = backends.get("tiled")
    for device in ("cpu", "cuda", "mps"):
        assert tiled.runs_on(device, with_grad=True)  # SDPA's and index_select's backward
    dense, flex = backends.get("dense"), backends.get("flex")
    for device in ("cpu", "cuda", "mps", "xpu"):
        assert dense.runs_on(device) and dense.runs_on(device, with_grad=True)
    assert flex.runs_on("cpu") and not flex.runs_on("cpu", with_grad=True)  # FlexAttention has no CPU backward
    assert flex.runs_on("cuda", with_grad=True) and not flex.runs_on("mps", with_grad=True)
    assert not flex.runs_on("tpu") and not flex.full_attention and dense.full_attention
    assert all(b.pooled for b in backends.TABLE.values())
    # each backend registered next to its code, its functions imported (no module paths as strings)
    from clear.backends import dense as dense_module, flex as flex_module, tiled as tiled_module

    for module in (dense_module, flex_module, tiled_module):
        assert backends.get(module.BACKEND.name) is module.BACKEND
        assert (module.BACKEND.grid_plan, module.BACKEND.band_plan, module.BACKEND.attend) == (
            module.grid_plan, module.band_plan, module.attend)
    # the checks, in order, each with its fix; decide is where they run
    with pytest.raises(ValueError, match="'flex' attention backend has no backward on cpu.*backend='auto' or 'dense'"):
        backends.decide("flex", Call("cpu", radius=2, with_grad=True))
    with pytest.raises(ValueError, match="does not run on tpu"):
        backends.decide("flex", Call("tpu", radius=2))
    assert "no pooled keys" in dataclasses.replace(dense, pooled=False).cannot_run(Call("cpu", radius=2, down_factor=2))
    with pytest.raises(ValueError, match=r"unknown attention backend 'sparse': choose one of \('auto', 'dense', "):
        backends.get("sparse")
    with pytest.raises(ValueError, match="must be one of .*'flex'.*got 'sparse'"):
        ClearAttention(3, backend="sparse")
    with pytest.raises(ValueError, match="unique and not 'auto': 'flex'"):
        backends.make_table(*backends.TABLE.values(), dataclasses.replace(dense, name="flex"))
    with pytest.raises(ValueError, match="unique and not 'auto': 'auto'"):
        backends.make_table(*backends.TABLE.values(), dataclasses.replace(dense, name="auto"))
    with pytest.raises(ValueError, match="reference backend"):
        backends.make_table(backends.get("flex"))
    with pytest.raises(TypeError):  # the table is read-only: a backend is added by its line in make_table
        backends.TABLE["toy"] = backends.get("dense")


def _record(image, radius, seconds, with_grad=False, df=1, heads=4, head_dim=24, text=32):
    return dict(image=image, text=text, radius=radius, down_factor=df, heads=heads, head_dim=head_dim,
                with_grad=with_grad, seconds=seconds)


FAKE_CPU = (
    _record(16 * 16, 4, {"dense": 0.001, "flex": 0.004, "tiled": 0.002}),
    _record(64 * 64, 4, {"dense": 0.040, "flex": 0.030, "tiled": 0.010}),
    _record(64 * 64, 4, {"dense": 0.040, "flex": 0.020, "tiled": 0.030}, head_dim=128, text=512),
    _record(64 * 64, 4, {"dense": 0.09, "flex": None, "tiled": 0.03}, with_grad=True),
    _record(64 * 64, 4, {"dense": 0.05, "flex": 0.01, "tiled": 0.06}, df=2),
    _record(64 * 64, None, {"dense": 0.05, "flex": None, "tiled": None}),
)


def test_auto_rule(monkeypatch):
    d = backends.decide
    cpu = lambda image, **kw: Call("cpu", image, **{"text": 32, "radius": 4, "heads": 4, "head_dim": 24, **kw})
    # a registered name stands for itself; full attention on a windows-only backend: the one fall-back
    assert d("flex", cpu(4096)) == d("flex", Call("cuda", 4096, radius=4, with_grad=True)) == ("flex", "as asked")
    with pytest.raises(ValueError, match="no backward on cpu"):  # a name that cannot run the call: its fix
        d("flex", cpu(4096, with_grad=True))
    assert d("flex", cpu(4096, radius=None))[0] == d("tiled", cpu(4096, radius=None))[0] == "dense"
    assert "plans local windows only" in d("flex", cpu(4096, radius=None))[1]
    with pytest.raises(ValueError, match="unknown attention backend"):
        d("sparse", cpu(16))
    # auto with measurements: the fastest backend of the nearest measured call that can run this one
    monkeypatch.setattr(backends, "measurements", lambda device: FAKE_CPU if device == "cpu" else ())
    assert d("auto", cpu(16 * 16))[0] == "dense"
    assert d("auto", cpu(20 * 20))[0] == "dense"  # nearer 16x16 than 64x64
    assert d("auto", cpu(64 * 64))[0] == "tiled"
    assert d("auto", cpu(128 * 128))[0] == "tiled"  # the largest measured grid stands for larger ones
    assert d("auto", cpu(64 * 64, head_dim=128, text=512))[0] == "flex"  # the head size decides
    assert d("auto", cpu(64 * 64, with_grad=True))[0] == "tiled"  # only records with a backward
    assert d("auto", cpu(64 * 64, down_factor=4))[0] == "flex"  # pooled keys: the df > 1 record
    assert d("auto", cpu(64 * 64, radius=None))[0] == "dense"  # full attention: its own record
    name, why = d("auto", cpu(64 * 64))
    assert "nearest" in why and "tiled 10.0 ms" in why and "dense 40.0 ms" in why
    only_fast = (_record(64 * 64, 4, {"dense": 0.5, "flex": 0.01, "tiled": None}, with_grad=True),)
    monkeypatch.setattr(backends, "measurements", lambda device: only_fast)
    assert d("auto", cpu(64 * 64, with_grad=True))[0] == "dense"  # flex has no CPU backward: never picked for it
    # no measurements for the device: the table's rule (flex on CUDA, the reference elsewhere)
    assert d("auto", Call("cuda", 16, radius=4, with_grad=True))[0] == "flex"
    assert d("auto", Call("cuda", 16, radius=None))[0] == "dense"
    assert d("auto", Call("mps", 10**6, radius=4))[0] == "dense"
    core = ClearAttention(None, backend="flex")  # full attention runs the reference backend, whatever was asked
    assert core.plan(TokenLayout(3, 4, 4), CPU).backend == "dense"


def test_shipped_cpu_measurements_drive_auto():
    """The shipped CPU measurements cover the mini model's and FLUX-shaped calls, inference and training; auto
    picks each record's fastest backend for that very call."""
    records = backends.measurements("cpu")
    assert records, "clear/backends/measured/cpu.json is missing: run scripts/benchmark.py auto"
    assert {(r["heads"], r["head_dim"]) for r in records} >= {(4, 24), (4, 128)}
    assert {r["with_grad"] for r in records} == {False, True} and {r["down_factor"] > 1 for r in records} == {False, True}
    for r in records:
        call = Call("cpu", r["image"], r["text"], r["radius"], r["down_factor"], r["heads"], r["head_dim"],
                    r["with_grad"])
        runnable = {n: t for n, t in r["seconds"].items() if t is not None and backends.get(n).runs_on("cpu", r["with_grad"])}
        assert backends.decide("auto", call)[0] == min(runnable, key=runnable.get)


def test_auto_logs_its_choice_once_per_layout(caplog):
    core = ClearAttention(4, backend="auto")
    core.heads, core.head_dim = 4, 24
    layout = TokenLayout(32, 8, 8)
    with caplog.at_level("INFO", logger="clear.attention"):
        for _ in range(3):
            core.plan(layout, CPU)
    lines = [r.getMessage() for r in caplog.records if "CLEAR attention" in r.getMessage()]
    assert len(lines) == 1 and "4 heads x 24, 8x8 image + 32 text tokens, r=4, df=1, inference" in lines[0]


def test_command_line_choices_are_the_registry_and_import_no_torch():
    """Command lines take their --backend choices from clear.defaults and still answer --help without torch; the
    choices are the registry's (which imports the backends themselves)."""
    code = "import sys, clear.defaults as d; print(d.BACKEND_CHOICES); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == [str(backends.choices()), "False"]


def test_flex_backward_on_cpu_fails_before_any_work_with_the_fix():
    core = ClearAttention(2, backend="flex")
    layout = TokenLayout(3, 4, 4)
    q, k, v = (t.requires_grad_() for t in _qkv(layout.seq_len, layout.seq_len))
    with pytest.raises(ValueError, match="no backward on cpu.*train with backend='auto' or 'dense'"):
        core(q, k, v, layout)
    assert not core._plans
    ClearAttention(2, backend="auto")(q, k, v, layout).sum().backward()  # auto: dense, with a backward
    assert q.grad is not None


def test_one_bounded_cache_holds_grid_and_band_plans():
    core = ClearAttention(3, backend="dense", cache_size=3)
    grids = [TokenLayout(2, 4, 5), TokenLayout(2, 6, 5)]
    bands = [BandLayout(2, 3, 5, 2, 0), BandLayout(2, 3, 5, 2, 2)]
    plans = [core.plan(x, CPU) for x in grids + bands]
    assert len(core._plans) == 3 and [p.layout for p in core._plans.values()] == grids[1:] + bands
    assert core.plan(bands[0], CPU) is plans[2]  # a hit
    assert core.plan(grids[0], CPU) is not plans[0]  # evicted, built again


def test_one_plan_serves_training_and_inference_unless_the_backend_plans_a_backward():
    """Dense's mask is the same with or without a backward: one cached plan (a 4K mask is gigabytes). Flex
    plans a backward (query-block lists), so it keeps two; and a call the backend cannot run still fails."""
    layout = TokenLayout(2, 6, 5)
    core = ClearAttention(3, backend="dense")
    assert core.plan(layout, CPU, with_grad=True) is core.plan(layout, CPU, with_grad=False)
    assert len(core._plans) == 1
    flex = ClearAttention(3, backend="flex")
    assert backends.get("flex").backward_plans and not backends.get("dense").backward_plans
    no_grad = flex.plan(layout, CPU)
    assert no_grad.block_mask.q_indices is None  # built for the forward only
    with pytest.raises(ValueError, match="no backward on cpu"):
        flex.plan(layout, CPU, with_grad=True)


# ------------------------------------------------------------------------------------------
# Adding a backend = one file (+ one line in the table)
# ------------------------------------------------------------------------------------------

TOY = '''
"""A toy backend: explicit float64 logits and clear.geometry's masks, written apart from dense.py."""
from dataclasses import dataclass

import torch

from clear.backends.base import Backend, Options
from clear.geometry import Window, allowed_mask, band_allowed_mask


@dataclass
class Plan:
    layout: object
    mask: torch.Tensor
    backend: str = ""

    def attend(self, query, key, value, scale, return_lse=False):
        return attend(query, key, value, scale, return_lse=return_lse, mask=self.mask)


def grid_plan(layout, window, device, options=Options(), with_grad=False):
    return Plan(layout, allowed_mask(layout, window, device))


def band_plan(band, window, device, options=Options()):
    return Plan(band, band_allowed_mask(band.rows, band.width, band.above, band.ext_rows, Window(window.radius),
                                        band.text_len, band.n_pooled, device))


def attend(query, key, value, scale, *, return_lse=False, options=Options(), mask=None):
    logits = torch.einsum("bqhd,bkhd->bhqk", query.double(), key.double()) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = logits.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (logits - lse[..., None]).exp(), value.double())
    return (out.float(), lse.transpose(1, 2).float()) if return_lse else out.to(query.dtype)


# its registration, next to its code: runs on CPU only, with a backward, full attention and pooled keys
BACKEND = Backend("toy", "explicit logits (a test)", grid_plan, band_plan, attend, devices=("cpu",))
'''


@pytest.fixture
def toy_backend(tmp_path, monkeypatch):
    (tmp_path / "toy_attention.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_attention

    spec = toy_attention.BACKEND
    monkeypatch.setattr(backends, "TABLE", backends.make_table(*backends.TABLE.values(), spec))  # its table line
    try:
        yield spec
    finally:
        sys.modules.pop("toy_attention", None)


def test_a_third_backend_is_one_file(toy_backend, tmp_path):
    assert backends.choices() == ("auto", "dense", "flex", "tiled", "toy")
    assert backends.resolve("auto", "mps", 10**6) == "dense"  # listed last, no auto entry: never auto's pick
    # ClearAttention on a grid, with pooled tokens
    layout, g = TokenLayout(5, 6, 8), torch.Generator().manual_seed(0)
    q, k, v = _qkv(layout.seq_len, layout.seq_len, seed=4)
    sw = torch.rand(1, 1, 1, 2, 1, 2, 1, generator=g)
    out = ClearAttention(2.5, 2, backend="toy")(q, k, v, layout, sw)
    torch.testing.assert_close(out, ClearAttention(2.5, 2, backend="dense")(q, k, v, layout, sw), atol=1e-5, rtol=1e-5)
    # a whole FLUX model through apply_clear
    model, x = tiny_flux(), flux_inputs(6, 10)
    clear.apply_clear(model, radius=3, backend="dense")
    with torch.no_grad():
        ref = model(**x).sample
    core = clear.apply_clear(model, radius=3, backend="toy")
    with torch.no_grad():
        out = model(**x).sample
    assert {p.backend for p in core._plans.values()} == {"toy"}
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'toy' attention backend does not run on cuda"):
        ClearAttention(3, backend="toy").plan(layout, torch.device("cuda"))
    # the patch-parallel attention (one gloo rank: its band is the whole grid, text merged with the log-sum-exp)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        attn = clear.parallelize(model)
        with torch.no_grad():
            par = model(**x).sample
        assert any(isinstance(p.layout, BandLayout) and p.backend == "toy" for p in core._plans.values())
        assert not hasattr(attn, "_plans")  # one cache: the core's
    finally:
        clear.unparallelize(model)
        dist.destroy_process_group()
    torch.testing.assert_close(par, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_flex_band_equals_dense():
    """The compiled kernel (what CUDA runs) on a band plan, on CPU; with the log-sum-exp (which the compiled CPU
    kernel does not return) the same plan runs eagerly."""
    window, band = Window(3), BandLayout(5, 6, 20, 2, 2, 4)
    q, k, v = _qkv(band.num_queries, band.num_keys, seed=9)
    flex = backends.get("flex").band_plan(band, window, CPU, Options(tile=(2, 8), compiled=True))
    dense = backends.get("dense").band_plan(band, window, CPU)
    torch.testing.assert_close(flex.attend(q, k, v, 0.35), dense.attend(q, k, v, 0.35), atol=1e-5, rtol=1e-5)
    for a, b in zip(flex.attend(q, k, v, 0.35, return_lse=True), dense.attend(q, k, v, 0.35, return_lse=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
