"""The ``flex`` backend: block-sparse FlexAttention over image tokens reordered into compact tiles.

A plan gathers queries and keys into tile order (:class:`clear.backends.flex_blocks.TileOrder`: image
tiles, padded to whole blocks, then text, then pooled tokens) and holds a ``BlockMask`` built
analytically from tile rectangles (:func:`~clear.backends.flex_blocks.analytic_block_mask`,
:func:`~clear.backends.flex_blocks.band_block_mask`), so blocks outside the window are never computed; the
output is gathered back to natural order. Compiled on CUDA (or when ``Options.compiled``, except
with the log-sum-exp on CPU, which the compiled CPU kernel does not return), eager elsewhere;
inside a region already being compiled, the plain op (the enclosing compile fuses it). FlexAttention has no backward on CPU. Tensors are ``[B, S, heads, D]``. Registered as :data:`BACKEND`
at the end of this file.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from types import MappingProxyType

import torch

from ..geometry import BandLayout, TokenLayout, Window
from .base import Backend, Options
from .flex_blocks import TileOrder, analytic_block_mask, band_block_mask

# Each new (batch, sequence length) recompiles the static-shape flex kernel. Past dynamo's
# default recompile limit (8) it would silently fall back to eager FlexAttention, which
# materialises every score: an out-of-memory at 4K. Our calls get a higher limit.
FLEX_RECOMPILE_LIMIT = 64


def _with_recompile_limit(fn, limit: int = FLEX_RECOMPILE_LIMIT):
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with dynamo_config.patch(**{name: max(limit, getattr(dynamo_config, name))}):
            return fn(*args, **kwargs)

    return run


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return _with_recompile_limit(torch.compile(flex_attention, dynamic=False))


@dataclass
class Plan:
    """Tile order and block mask of one layout. ``to_flex``: the query index of each flex
    query position; ``kv_to_flex``: the key index of each flex key position; ``from_flex``: the
    flex position of each query (to gather the output back)."""

    layout: TokenLayout | BandLayout
    to_flex: torch.Tensor
    kv_to_flex: torch.Tensor
    from_flex: torch.Tensor
    block_mask: object
    options: Options = Options()
    order: TileOrder | None = None  # whole grids: the tile order (queries and keys alike)
    backend: str = "flex"

    def attend(self, query, key, value, scale: float, return_lse: bool = False):
        q = query.index_select(1, self.to_flex)
        k, v = (x.index_select(1, self.kv_to_flex) for x in (key, value))
        out = attend(q, k, v, scale, return_lse=return_lse, options=self.options, block_mask=self.block_mask)
        if not return_lse:
            return out.index_select(1, self.from_flex)
        return tuple(x.index_select(1, self.from_flex) for x in out)


def grid_plan(layout: TokenLayout, window: Window, device, options: Options = Options(), with_grad: bool = False):
    """Keys are ``[natural order | pooled]``: the pooled tokens keep their place after the tiles' order."""
    if layout.frames > 1:  # a video: frame tiles, block mask from 3-D tile boxes
        from . import flex_video

        return flex_video.grid_plan(layout, window, device, options, with_grad)
    order = TileOrder(layout, window, *options.tile)
    to_flex, from_flex = order.gather_indices(device)
    n_pooled = layout.num_pooled(window)
    kv_to_flex = to_flex if not n_pooled else torch.cat(
        [to_flex, layout.seq_len + torch.arange(n_pooled, device=device)])
    return Plan(layout, to_flex, kv_to_flex, from_flex, analytic_block_mask(order, device, with_q_blocks=with_grad),
                options, order)


def band_plan(band: BandLayout, window: Window, device, options: Options = Options()):
    """Queries are the band in tile order; keys are the extended band in tile order, then text and pooled."""
    win = Window(window.radius)
    q_order = TileOrder(TokenLayout(0, band.rows, band.width), win, *options.tile)
    kv_order = TileOrder(TokenLayout(0, band.ext_rows, band.width), win, *options.tile)
    to_flex, from_flex = q_order.gather_indices(device)
    kv_img, _ = kv_order.gather_indices(device)
    t, n_ext = band.text_len, band.ext_rows * band.width
    kv_to_flex = torch.cat([t + kv_img, torch.arange(t, device=device),
                            t + n_ext + torch.arange(band.n_pooled, device=device)])
    block_mask = band_block_mask(q_order, kv_order, band.above, t + band.n_pooled, device)
    return Plan(band, to_flex, kv_to_flex, from_flex, block_mask, options)


def attend(query, key, value, scale: float, *, return_lse: bool = False, options: Options = Options(),
           block_mask=None):
    """FlexAttention of ``query [B, Sq, H, D]`` on ``key/value [B, Sk, H, D]`` (``block_mask``
    ``None``: every key). ``return_lse``: ``(out, lse)`` in float32."""
    from torch.nn.attention import flex_attention as fa

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    kwargs = dict(block_mask=block_mask, scale=scale)
    if return_lse and hasattr(fa, "AuxRequest"):
        kwargs["return_aux"] = fa.AuxRequest(lse=True)
    elif return_lse:  # torch < 2.9
        kwargs["return_lse"] = True
    if torch.compiler.is_compiling():
        out = fa.flex_attention(q, k, v, kernel_options=options.kernel_options, **kwargs)
    elif (q.is_cuda or options.compiled) and not (return_lse and q.device.type == "cpu"):  # CPU kernel: no lse
        out = _compiled_flex()(q, k, v, kernel_options=options.kernel_options, **kwargs)
    else:
        with warnings.catch_warnings():  # eager (unfused) flex is expected off CUDA
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = fa.flex_attention(q, k, v, **kwargs)
    if not return_lse:
        return out.transpose(1, 2)
    out, aux = out
    lse = aux.lse if hasattr(aux, "lse") else aux
    return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


# Its registration: FlexAttention has no backward on CPU (nor on MPS); windows only; a call with a backward
# gets its own grid plan (with the query-block lists the backward reads); ``auto``'s pick on CUDA.
BACKEND = Backend("flex", "block-sparse FlexAttention over tile-ordered tokens, block masks from tile geometry; "
                  "compiled on CUDA", grid_plan, band_plan, attend,
                  devices=("cuda", "cpu", "xpu", "hpu", "mps"), backward=("cuda", "xpu", "hpu"), full_attention=False,
                  backward_plans=True, auto=MappingProxyType({"cuda": 0}))
