"""The ``tiled`` backend: query tiles, each with its gathered key window, in one batched SDPA.

Every image query of a ``tile_h x tile_w`` tile sees the same small neighbourhood of image keys:
the tile grown by the window's reach (``halo`` rows and columns on each side). A plan lists, once
per layout, the query positions of every tile, the key positions of its window box and the
boolean mask inside it (the circle, and the box's cells outside the grid hidden); a call gathers
queries and keys with one ``index_select`` each, runs ONE ``scaled_dot_product_attention`` over
``[tiles, B * heads, tile, window]``, and gathers the output back to natural order. Text queries
see every text and image key (never pooled ones): one unmasked SDPA. The backward is SDPA's and
``index_select``'s, so it trains on every device.

The keys every image query sees besides its window, the text keys and the pooled keys (the
*shared* keys), are handled in one of two ways (:func:`split_for`):

* few of them (under :data:`SPLIT_FROM`): gathered into every tile's window, ``[box | text |
  pooled]``, so one SDPA covers all of a query's keys;
* many: attended once, all image queries against the shared keys in one call, and merged with
  the windows' softmax exactly: with ``lse`` the log-sum-exp of each part's scaled logits,
  ``out = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2)`` (:func:`_merge`, computed with
  ``logaddexp``). Nothing is copied per tile but the window box.

  - On CPU both parts run in SDPA's CPU kernel, which also returns the log-sum-exp
    (:data:`FUSED_WITH_LSE`); with a backward, :class:`_FusedParts` runs the kernel's own
    backward on each part with the merged output and log-sum-exp, as ring attention merges blocks.
  - Elsewhere (other devices, or a torch without that kernel), one part, the one with fewer keys
    per query, gets explicit float32 logits (its output and log-sum-exp, differentiable torch
    ops); the other runs in SDPA with ONE extra key that stands for the explicit part: its logit
    is the explicit part's log-sum-exp (an extra channel of the query, ``lse / scale``, against a
    1 in the extra key) and its value a one-hot extra channel. SDPA's own softmax then weighs the
    two parts, its extra output channel is the explicit part's weight ``e^lse_E / (e^lse_E +
    e^lse_F)``, and ``out = out_F[:D] + out_F[D] * o_E`` is the exact merge, with SDPA's kernel
    and backward. In lower precision the extra logit rides in two channels (a high and a low
    part), so it keeps float32's precision.

With ``return_lse`` (patch-parallel bands), when the kernel's log-sum-exp cannot serve (a
backward, or off CPU), every part's logits are computed explicitly in float32 (they are small) and
the parts merge by ``logaddexp``.

Tiles that lie wholly inside the grid share one mask (the circle): they run as one batch with a
broadcast mask, and only the tiles on the border carry masks of their own, so the plan's memory
grows with the grid's perimeter, not its area.

The tile is chosen from the reach and the number of keys gathered besides the box
(:func:`tile_for`, measured on CPU, docs/benchmarks.md). Tensors are ``[B, S, heads, D]``; see
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

# Logits materialised at once by the log-sum-exp paths (tiles or queries are taken in chunks below it).
MAX_LOGITS = 2**26
# Elements of gathered keys (as many of values) held at once by a forward; more tiles run in chunks. 2**24 (64 MiB
# of float32 keys) is still ~15 tiles of FLUX-shaped heads (r = 16) or ~900 tiles of the mini model's (r = 4).
MAX_GATHERED = 2**24
# From this many shared keys (text + pooled) on, they run as their own attention call merged by log-sum-exp
# instead of being gathered into every tile: each tile's copy of them costs 2 * shared * head_dim elements
# (keys and values) per batch and head; the split costs a second SDPA call and a merge over the image outputs
# (off CPU: one extra key per tile, one or two extra channels per head and explicit logits for one part).
# Chosen by reasoning, not measured on an idle machine: tune it with scripts/benchmark.py (FLUX-shaped heads
# have 512 text keys; the mini model 32, plus (H/df)(W/df) pooled with down_factor df).
SPLIT_FROM = 256
# With the split off CPU (the differentiable merge), the window part gets the explicit logits when the shared
# keys outnumber its box's keys by more than this factor (pooled keys at high resolution), else the shared part
# does. Explicit logits cost a few passes over memory per logit, SDPA's fused kernel none: the part with fewer
# keys per query takes them.
EXPLICIT_WINDOW_ABOVE = 1.0


def _cpu_kernel(name: str):
    """SDPA's CPU kernel ``name`` (``torch.ops.aten``) where this torch has it with a mask, else ``None``."""
    op = getattr(torch.ops.aten, name, None)
    try:
        return op if op is not None and "attn_mask" in str(op.default._schema) else None
    except (AttributeError, RuntimeError):
        return None


# SDPA's CPU kernel that also returns the log-sum-exp (``out, lse [B, heads, L]`` float32; the lse without a
# gradient), and its backward, which takes the output and log-sum-exp as arguments: the split runs both parts in
# it and merges them (:class:`_FusedParts`). ``None`` where torch lacks them: the differentiable merge runs.
FUSED_WITH_LSE = _cpu_kernel("_scaled_dot_product_flash_attention_for_cpu")
FUSED_BACKWARD = _cpu_kernel("_scaled_dot_product_flash_attention_for_cpu_backward")


def reach(window: Window) -> int:
    """The largest |dy| (and |dx|) with ``dy^2 < radius^2``: how far a window reaches from its query."""
    return math.isqrt(window.radius_sq_bound - 1)


def tile_for(halo: int, n_global: int, height: int, width: int) -> tuple[int, int]:
    """The query tile for a reach of ``halo`` with ``n_global`` keys gathered into every tile besides its box
    (text and pooled; 0 when they run as their own call) on a ``height x width`` grid: 8 x 8, or 16 x 16 where
    the window reaches 8 tokens or more or there are 256 gathered keys or more (each tile gathers its own copy
    of them: fewer, larger tiles copy less). Measured on CPU for head sizes 24 and 128, radii 4, 8, 16 and 32
    or 512 text tokens (docs/benchmarks.md)."""
    side = 16 if halo >= 8 or n_global >= 256 else 8
    return min(side, height), min(side, width)


def split_for(n_shared: int, box: int) -> str | None:
    """How ``n_shared`` keys every image query sees (text and pooled) meet windows of ``box`` keys: ``None``,
    gathered into every tile (fewer than :data:`SPLIT_FROM`); else their own call, merged by log-sum-exp, with
    explicit logits for the ``"window"`` part (more than :data:`EXPLICIT_WINDOW_ABOVE` x ``box`` shared keys)
    or the ``"shared"`` part."""
    if n_shared == 0 or n_shared < SPLIT_FROM:
        return None
    return "window" if n_shared > EXPLICIT_WINDOW_ABOVE * box else "shared"


@dataclass
class _Group:
    """Tiles that run as one batch: ``q_idx [tiles, tq]`` query positions, ``kv_idx [tiles, tk]`` key
    positions, ``bias`` ``[tiles or 1, 1, tq, tk (+ 1)]``: 0 where the query sees the key, -inf elsewhere
    (float32; cast to a call's dtype). With ``sink`` the bias has one more column, 0: the extra key that
    stands for the shared keys' part (see the module's docstring)."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    bias: torch.Tensor
    sink: bool = False

    def chunks(self, step: int):
        """The group as sub-groups of at most ``step`` tiles."""
        n = self.q_idx.shape[0]
        if n <= step:
            return [self]
        return [_Group(self.q_idx[i : i + step], self.kv_idx[i : i + step],
                       self.bias if self.bias.shape[0] == 1 else self.bias[i : i + step], self.sink)
                for i in range(0, n, step)]


@dataclass
class Plan:
    """The tile groups of one layout (interior tiles share a mask; border tiles have their own) and what
    puts the outputs back together: ``image``, the image queries in the call's queries; ``from_tiles
    [image queries]``, each image query's (row-major) position in the groups' concatenated outputs;
    ``text``, the text queries (whole grids with text; ``None`` for bands), which see keys ``[0, text_kv)``;
    ``shared``, the shared keys' positions when they run as their own call (``None``: gathered into the
    tiles) and ``explicit``, the part with explicit logits then (:func:`split_for`)."""

    layout: TokenLayout | BandLayout
    groups: list
    image: slice
    from_tiles: torch.Tensor
    text: slice | None = None
    text_kv: int = 0
    tile: tuple[int, int] = (0, 0)
    shared: torch.Tensor | None = None
    explicit: str | None = None
    backend: str = "tiled"

    def attend(self, query, key, value, scale: float, return_lse: bool = False):
        """``query [B, S, heads, D]``, ``key/value [B, Sk, heads, D]`` (the plan's key order) -> ``[B, S, heads,
        D]``, or with ``return_lse`` ``(out, lse [B, S, heads])``, both float32."""
        image = self._image(query, key, value, scale, return_lse)
        if self.text is None:
            return image
        kv = slice(0, self.text_kv)
        text = dense.attend(query[:, self.text], key[:, kv], value[:, kv], scale, return_lse=return_lse)
        first = self.layout.text_first
        if not return_lse:
            return torch.cat([text, image] if first else [image, text], 1)
        return tuple(torch.cat([t, i] if first else [i, t], 1) for t, i in zip(text, image))

    def _untile(self, parts):
        """Group outputs ``[B, tiles * tq, heads, ...]`` (slot order), or ``(out, lse)`` pairs of them ->
        ``[B, image queries, heads, ...]`` in row-major order (or the pair)."""
        if isinstance(parts[0], tuple):
            return tuple(self._untile(list(p)) for p in zip(*parts))
        return torch.cat(parts, 1).index_select(1, self.from_tiles)

    def _image(self, query, key, value, scale: float, return_lse: bool):
        """The image queries' outputs ``[B, N, heads, D]`` in row-major order (and their log-sum-exp)."""
        if self.shared is None:
            return self._untile([_windows(query, key, value, g, scale, "explicit" if return_lse else None)
                                 for g in self.groups])
        q_img = query[:, self.image]
        k_sh, v_sh = key.index_select(1, self.shared), value.index_select(1, self.shared)
        if _fused_lse_runs(query, key, value):  # no backward: both parts in SDPA's kernel, with their log-sum-exp
            window = self._untile([_windows(query, key, value, g, scale, "fused") for g in self.groups])
            out, lse = FUSED_WITH_LSE(q_img.transpose(1, 2), k_sh.transpose(1, 2), v_sh.transpose(1, 2), scale=scale)
            return _merge(window, (out.transpose(1, 2), lse.transpose(1, 2)), query.dtype, return_lse)
        if not return_lse and _fused_backward_runs(query):  # a backward on CPU: the kernel's, part by part
            tiles = []
            for g in self.groups:
                bias = g.bias[..., : g.kv_idx.shape[1]] if g.sink else g.bias
                tiles += [_tile_batch(query, g.q_idx), _tile_batch(key, g.kv_idx), _tile_batch(value, g.kv_idx),
                          bias.to(query.dtype)]
            slot_query = torch.cat([g.q_idx.reshape(-1) for g in self.groups]) - self.image.start
            return _FusedParts.apply(scale, self.from_tiles, slot_query, q_img.transpose(1, 2), k_sh.transpose(1, 2),
                                     v_sh.transpose(1, 2), *tiles)
        if return_lse or self.explicit == "window":
            window = self._untile([_windows(query, key, value, g, scale, "explicit") for g in self.groups])
        if return_lse or self.explicit == "shared":
            shared = _explicit_shared(q_img, k_sh, v_sh, scale)
        if return_lse:  # both explicit
            return _merge(window, shared, torch.float32, True)
        d = query.shape[-1]
        if self.explicit == "window":
            fused = _shared_with_sink(q_img, k_sh, v_sh, scale, _sink_logit(window[1], scale, d, query))
            o_exp = window[0]
        else:
            sink = _sink_logit(shared[1], scale, d, query)
            fused = self._untile([_windows(query, key, value, g, scale, None, sink, self.image.start)
                                  for g in self.groups])
            o_exp = shared[0]
        return (fused[..., :d] + fused[..., d : d + 1] * o_exp).to(query.dtype)


def _fused_lse_runs(query, key, value) -> bool:
    """Whether :data:`FUSED_WITH_LSE` serves this call: on CPU, with no backward to run."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return FUSED_WITH_LSE is not None and query.device.type == "cpu" and not needs_grad


def _fused_backward_runs(query) -> bool:
    """Whether :class:`_FusedParts` serves a call with a backward: on CPU, where torch has both kernels."""
    return FUSED_WITH_LSE is not None and FUSED_BACKWARD is not None and query.device.type == "cpu"


class _FusedParts(torch.autograd.Function):
    """The split with a backward on CPU: the image queries against their windows (the tile groups) and against the
    shared keys, each part in SDPA's CPU kernel, merged by the kernels' log-sum-exp. The backward runs the
    kernel's own backward on every part with the merged output and log-sum-exp (a part's share of the softmax is
    the whole's restricted to its keys, the way ring attention merges blocks), so it keeps nothing but the
    inputs, the output and the log-sum-exp.

    ``apply(scale, from_tiles [N], slot_query [slots], qs [B, heads, N, D], ks/vs [B, heads, G, D], *tiles)``:
    ``tiles`` are ``(q [n, B * heads, tq, D], k/v [n, B * heads, nb, D], bias)`` per group; ``slot_query`` each
    slot's image query (padding slots repeat one); returns ``[B, N, heads, D]``."""

    @staticmethod
    def forward(ctx, scale, from_tiles, slot_query, qs, ks, vs, *tiles):
        b, heads = qs.shape[:2]
        parts = [FUSED_WITH_LSE(*tiles[i : i + 3], attn_mask=tiles[i + 3], scale=scale)
                 for i in range(0, len(tiles), 4)]
        window = tuple(torch.cat([_from_tile_batch(p[j], b, heads) for p in parts], 1).index_select(1, from_tiles)
                       for j in (0, 1))
        o_s, l_s = FUSED_WITH_LSE(qs, ks, vs, scale=scale)
        out, lse = _merge(window, (o_s.transpose(1, 2), l_s.transpose(1, 2)), qs.dtype, True)
        out = out.to(qs.dtype)
        ctx.scale = scale
        ctx.save_for_backward(from_tiles, slot_query, qs, ks, vs, out, lse, *tiles)
        return out

    @staticmethod
    def backward(ctx, grad):
        from_tiles, slot_query, qs, ks, vs, out, lse, *tiles = ctx.saved_tensors
        b, heads = qs.shape[:2]
        grad = grad.to(qs.dtype)
        dqs, dks, dvs = FUSED_BACKWARD(grad.transpose(1, 2), qs, ks, vs, out.transpose(1, 2), lse.transpose(1, 2),
                                       0.0, False, scale=ctx.scale)
        # slot order; padding slots get no gradient and an infinite log-sum-exp (their probabilities are 0)
        real = from_tiles.index_select(0, slot_query) == torch.arange(slot_query.numel(), device=grad.device)
        g_slots = grad.index_select(1, slot_query) * real[None, :, None, None]
        o_slots = out.index_select(1, slot_query)
        l_slots = lse.index_select(1, slot_query).masked_fill(~real[None, :, None], float("inf"))
        grads, start = [], 0
        for i in range(0, len(tiles), 4):
            q, k, v, bias = tiles[i : i + 4]
            n, tq = q.shape[0], q.shape[2]
            rows = slice(start, start + n * tq)
            start += n * tq
            grads += [*FUSED_BACKWARD(_tile_batch_of(g_slots[:, rows], n), q, k, v, _tile_batch_of(o_slots[:, rows], n),
                                      _tile_batch_of(l_slots[:, rows], n), 0.0, False, attn_mask=bias, scale=ctx.scale),
                      None]
        return (None, None, None, dqs, dks, dvs, *grads)


def _merge(a, b, dtype, return_lse: bool):
    """Two parts' ``(out [B, N, heads, D], lse [B, N, heads])`` of one softmax -> the whole's output in ``dtype``
    (and log-sum-exp; then both float32): ``(e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b)``."""
    (o_a, l_a), (o_b, l_b) = a, b
    lse = torch.logaddexp(l_a, l_b)
    out = (l_a - lse).exp()[..., None] * o_a + (l_b - lse).exp()[..., None] * o_b
    return (out.float(), lse) if return_lse else out.to(dtype)


def _tiles_of(x, idx):
    """``x [B, S, heads, C]`` at ``idx [tiles, length]`` -> a view ``[tiles, B, heads, length, C]`` of one copy."""
    b, _, heads, c = x.shape
    n, length = idx.shape
    return x.index_select(1, idx.reshape(-1)).view(b, n, length, heads, c).permute(1, 0, 3, 2, 4)


def _tile_batch(x, idx):
    """``x [B, S, heads, C]`` at ``idx [tiles, length]`` -> ``[tiles, B * heads, length, C]`` (SDPA's batch)."""
    b, _, heads, c = x.shape
    return _tiles_of(x, idx).reshape(idx.shape[0], b * heads, idx.shape[1], c)


def _from_tile_batch(t, b: int, heads: int):
    """``[tiles, B * heads, tq, ...]`` -> ``[B, tiles * tq, heads, ...]`` (slot order)."""
    n, _, tq = t.shape[:3]
    t = t.reshape(n, b, heads, tq, *t.shape[3:]).transpose(2, 3).transpose(0, 1)
    return t.reshape(b, n * tq, heads, *t.shape[4:])


def _tile_batch_of(t, n: int):
    """``[B, tiles * tq, heads, ...]`` (slot order) -> ``[tiles, B * heads, tq, ...]``: :func:`_from_tile_batch`'s
    inverse."""
    b, slots, heads = t.shape[:3]
    t = t.reshape(b, n, slots // n, heads, *t.shape[3:]).transpose(0, 1).transpose(2, 3)
    return t.reshape(n, b * heads, slots // n, *t.shape[4:])


def _windows(query, key, value, g: _Group, scale: float, lse: str | None = None, sink=None, offset: int = 0):
    """The group's tiles as one batch ``[tiles, B * heads, tile, window]`` (the tile leads, so a mask of
    ``[tiles, 1, tq, tk]`` broadcasts over batch and heads without a copy). Returns ``[B, tiles * tq, heads,
    D]`` in slot order (tile-major). With ``lse`` (the sink column left out) ``(out, lse [B, tiles * tq,
    heads])``: ``"explicit"`` from float32 logits (differentiable; out in float32), ``"fused"`` from
    :data:`FUSED_WITH_LSE` (no backward). With ``sink [B, N, heads, x]`` (the extra key's logit over ``scale``
    by image query, ``offset`` the first image query's position) ``[B, tiles * tq, heads, D + x]``: the extra
    key's weight in channel ``D``."""
    b, _, heads, d = query.shape
    n, tq = g.q_idx.shape
    nb = g.kv_idx.shape[1]
    x = 0 if sink is None else sink.shape[-1]
    chunk = max(1, MAX_GATHERED // max(1, b * heads * (nb + 1) * (d + x)))  # tiles whose keys are gathered at once
    if lse != "explicit" and n > chunk:  # bound the gathered copies (many tiles x long text at high resolution)
        parts = [_windows(query, key, value, c, scale, lse, sink, offset) for c in g.chunks(chunk)]
        if lse is None:
            return torch.cat(parts, 1)
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    gather = _tile_batch

    def untile(t):  # [tiles, B * heads, tq, ...] -> [B, tiles * tq, heads, ...]
        return _from_tile_batch(t, b, heads)

    bias = g.bias[..., :nb] if g.sink and sink is None else g.bias
    if lse == "explicit":
        q, k, v = gather(query, g.q_idx), gather(key, g.kv_idx), gather(value, g.kv_idx)
        step = max(1, MAX_LOGITS // max(1, b * heads * tq * nb))
        outs, lses = [], []
        for i in range(0, n, step):
            logits = (q[i : i + step].float() @ k[i : i + step].float().transpose(-1, -2)) * scale
            logits = logits + (bias if bias.shape[0] == 1 else bias[i : i + step]).float()
            lse_i = logits.logsumexp(-1)
            outs.append((logits - lse_i[..., None]).exp() @ v[i : i + step].float())
            lses.append(lse_i)
        return untile(torch.cat(outs)), untile(torch.cat(lses))
    if sink is None:
        q, k, v = gather(query, g.q_idx), gather(key, g.kv_idx), gather(value, g.kv_idx)
    else:  # one copy each, straight into buffers with the extra channels and the extra key
        q = query.new_empty(n, b, heads, tq, d + x)
        q[..., :d] = _tiles_of(query, g.q_idx)
        q[..., d:] = _tiles_of(sink, g.q_idx - offset)
        k, v = _with_sink_key(_tiles_of(key, g.kv_idx), x), _with_sink_key(_tiles_of(value, g.kv_idx), x, value=True)
        q, k, v = (t.view(n, b * heads, t.shape[-2], d + x) for t in (q, k, v))
    bias = bias if bias.dtype == q.dtype else bias.to(q.dtype)
    if lse == "fused":
        out, lse_t = FUSED_WITH_LSE(q, k, v, attn_mask=bias, scale=scale)
        return untile(out), untile(lse_t)
    return untile(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale))  # from [tiles, B*heads, tq, D]


def _with_sink_key(t, x: int, value: bool = False):
    """``t [..., keys, D]`` -> ``[..., keys + 1, D + x]``: ``x`` zero channels, and one extra key whose channels
    are 0 but the extra ones: for keys 1 in each of the logit's channels (of :func:`_sink_logit`), for values 1 in
    the first (the extra key's weight)."""
    *lead, keys, d = t.shape
    out = t.new_empty(*lead, keys + 1, d + x)
    out[..., :keys, :d] = t
    out[..., :keys, d:] = 0
    out[..., keys, :] = 0
    if value:
        out[..., keys, d] = 1
    else:
        out[..., keys, d : d + _logit_channels(t.dtype)] = 1
    return out


def _logit_channels(dtype) -> int:
    """Channels that carry the extra key's logit: one in float32/64; a high and a low part in lower precision."""
    return 1 if dtype in (torch.float32, torch.float64) else 2


def _sink_logit(lse, scale: float, d: int, like):
    """The explicit part's ``lse [B, N, heads]`` (float32) as the query's extra channels ``[B, N, heads, x]`` in
    ``like``'s dtype, whose sum times ``scale`` is ``lse``: one channel, or a high and a low part (bfloat16
    alone would round a logit of 10 by 0.03). Off CPU, zero channels pad ``D + x`` to a multiple of 8 (the
    fused CUDA kernels need it)."""
    z = lse / scale
    if _logit_channels(like.dtype) == 1:
        cols = z.to(like.dtype)[..., None]
    else:
        hi = z.to(like.dtype)
        cols = torch.stack([hi, (z - hi.float()).to(like.dtype)], -1)
    pad = 0 if like.device.type == "cpu" else -(d + cols.shape[-1]) % 8
    return F.pad(cols, (0, pad)) if pad else cols


def _explicit_shared(q_img, k_sh, v_sh, scale: float):
    """All image queries ``q_img [B, N, heads, D]`` against the shared keys ``k_sh/v_sh [B, G, heads, D]`` with
    explicit float32 logits, queries in chunks of at most :data:`MAX_LOGITS` logits: ``(out [B, N, heads, D],
    lse [B, N, heads])``, float32."""
    b, n, heads, _ = q_img.shape
    step = max(1, MAX_LOGITS // max(1, b * heads * k_sh.shape[1]))
    parts = [dense.attend(q_img[:, i : i + step], k_sh, v_sh, scale, return_lse=True) for i in range(0, n, step)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _shared_with_sink(q_img, k_sh, v_sh, scale: float, sink):
    """All image queries ``q_img [B, N, heads, D]`` against the shared keys ``[B, G, heads, D]`` plus the extra key
    whose logit ``sink [B, N, heads, x]`` carries (times ``scale``): one unmasked SDPA -> ``[B, N, heads, D + x]``,
    the extra key's weight in channel ``D``."""
    b, n, heads, d = q_img.shape
    x = sink.shape[-1]
    q = q_img.new_empty(b, heads, n, d + x)
    q[..., :d] = q_img.transpose(1, 2)
    q[..., d:] = sink.transpose(1, 2)
    k, v = _with_sink_key(k_sh.transpose(1, 2), x), _with_sink_key(v_sh.transpose(1, 2), x, value=True)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def _tiles(q_rows: int, width: int, row_offset: int, k_rows: int, window: Window, tile: tuple[int, int],
           key_of_cell, global_keys: torch.Tensor, device, sink: bool = False):
    """The tile groups of ``q_rows x width`` image queries (query position ``row * width + col``) whose
    row ``i`` is row ``i + row_offset`` of a ``k_rows x width`` key grid (``key_of_cell(rows, cols)``: key
    positions), each also seeing ``global_keys`` (gathered into every tile; may be empty) and, with ``sink``,
    one extra key after them. Returns ``(groups, q_slots)``: ``q_slots [q_rows*width]`` is each query's
    position in the groups' concatenated output."""
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
    glob = torch.ones(tq, global_keys.numel() + sink, dtype=torch.bool, device=device)
    shared = torch.cat([circle, glob], 1)  # [tq, nb + globals (+ sink)]
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
        groups.append(_Group(q_pos[ids].contiguous(), k_pos[ids].contiguous(), bias, sink))
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


def _arrangement(halo: int, n_shared: int, q_rows: int, width: int, k_rows: int, options: Options):
    """The query tile and :func:`split_for`'s answer for ``n_shared`` shared keys of a ``q_rows x width`` query grid
    on ``k_rows`` key rows."""
    split = split_for(n_shared, math.inf) is not None  # whether to split does not depend on the box
    tile = options.query_tile or tile_for(halo, 0 if split else n_shared, q_rows, width)
    th, tw = min(tile[0], q_rows), min(tile[1], width)
    box = (th + 2 * min(halo, k_rows - 1)) * (tw + 2 * min(halo, width - 1))
    return tile, split_for(n_shared, box)


def grid_plan(layout: TokenLayout, window: Window, device, options: Options = Options(), with_grad: bool = False):
    """Queries in natural order; keys ``[natural order | pooled]``."""
    if layout.frames > 1:  # a video: 3-D query tiles
        from . import tiled_video

        return tiled_video.grid_plan(layout, window, device, options, with_grad)
    device = torch.device(device)
    h, w, t = layout.height, layout.width, layout.text_len
    img0 = layout.image_slice.start
    n_pooled = layout.num_pooled(window)
    shared = torch.cat([torch.arange(layout.text_slice.start, layout.text_slice.stop, device=device),
                        layout.seq_len + torch.arange(n_pooled, device=device)])
    tile, explicit = _arrangement(reach(window), shared.numel(), h, w, h, options)
    gathered = shared if explicit is None else shared[:0]
    groups, q_slots = _tiles(h, w, 0, h, window, tile, lambda r, c: img0 + r * w + c, gathered, device,
                             sink=explicit == "shared")
    # the group outputs hold ``img0 + position`` queries: shift their positions into the natural order
    for g in groups:
        g.q_idx = g.q_idx + img0
    return Plan(layout, groups, layout.image_slice, q_slots, layout.text_slice if t else None, layout.seq_len, tile,
                None if explicit is None else shared, explicit)


def band_plan(band: BandLayout, window: Window, device, options: Options = Options()):
    """Queries: the band's image tokens (row-major); keys ``[text | extended band | pooled]``."""
    device = torch.device(device)
    win = Window(window.radius)  # pooled keys are counted by the band itself
    t, w = band.text_len, band.width
    shared = torch.cat([torch.arange(t, device=device),
                        t + band.ext_rows * w + torch.arange(band.n_pooled, device=device)])
    tile, explicit = _arrangement(reach(win), shared.numel(), band.rows, w, band.ext_rows, options)
    gathered = shared if explicit is None else shared[:0]
    groups, q_slots = _tiles(band.rows, w, band.above, band.ext_rows, win, tile, lambda r, c: t + r * w + c,
                             gathered, device, sink=explicit == "shared")
    return Plan(band, groups, slice(0, band.num_queries), q_slots, tile=tile,
                shared=None if explicit is None else shared, explicit=explicit)


def attend(query, key, value, scale: float, *, return_lse: bool = False, options: Options = Options()):
    """Unmasked attention (the text queries of patch parallelism): the dense backend's."""
    return dense.attend(query, key, value, scale, return_lse=return_lse)


# Its registration: a backward everywhere (SDPA's and index_select's), pooled keys; windows only.
BACKEND = Backend("tiled", "query tiles with their gathered key windows in one batched scaled_dot_product_attention; "
                  "a backward everywhere", grid_plan, band_plan, attend, full_attention=False)
