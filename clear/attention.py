"""The one CLEAR attention entry point every processor calls.

:class:`ClearAttention` takes ``q, k, v`` of one attention call in the model's natural
token order (``[B, S, heads, head_dim]``, as diffusers' processors hold them), and
returns the attention output in the same order. It owns the backend choice and the
per-layout cache of masks; it holds no model weights (``spatial_weight`` belongs to
the processor of each attention module and is passed in).

Backends:

* ``"dense"``: boolean mask + ``scaled_dot_product_attention``. Runs everywhere,
  supports backward; the oracle every fast path is tested against.
* ``"flex"``: FlexAttention over image tokens reordered into compact tiles, with a
  block mask built analytically from tile geometry. Compiled on CUDA.
* ``"auto"``: ``flex`` on CUDA; on CPU ``flex`` (its compiled kernel) for inference on grids of
  at least :data:`CPU_FLEX_MIN_TOKENS` image tokens, where it beats dense, else ``dense``
  (FlexAttention has no CPU backward).

Under ``torch.compile`` the plan of each layout is built outside the traced code (by the
forward pre-hook of :func:`clear.apply_clear`, which dynamo does not trace) and handed in
with ``plan=``; the traced call only reads its tensors.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import TileOrder, TokenLayout, Window, allowed_mask, analytic_block_mask

BACKENDS = ("auto", "dense", "flex")
# proportional_attention: False (1/sqrt(d)), True = "release" (the public release's scale: log_L0(10·N) for
# down-sampled variants, log_L0(N) otherwise) or "plain" (log_L0(N) for every variant)
PROPORTIONAL = (False, True, "release", "plain")


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


# ``auto`` on CPU: image tokens from which compiled FlexAttention beats dense SDPA for inference
# (measured with scripts/benchmark.py attention --compile full, see docs/benchmarks.md).
CPU_FLEX_MIN_TOKENS = 64 * 64


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return _with_recompile_limit(torch.compile(flex_attention, dynamic=False))


def _flex(query, key, value, block_mask, scale, kernel_options=None, return_lse=False, compiled=None):
    """FlexAttention on ``[B, H, S, D]``: compiled on CUDA (or when ``compiled``), eager
    elsewhere; inside a region already being compiled, the plain op (the enclosing compile
    fuses it). ``return_lse``: also the log-sum-exp ``[B, H, S]`` (for merging partial softmaxes)."""
    from torch.nn.attention import flex_attention as fa

    kwargs = dict(block_mask=block_mask, scale=scale)
    if return_lse and hasattr(fa, "AuxRequest"):
        kwargs["return_aux"] = fa.AuxRequest(lse=True)
    elif return_lse:  # torch < 2.9
        kwargs["return_lse"] = True
    if torch.compiler.is_compiling():
        out = fa.flex_attention(query, key, value, kernel_options=kernel_options, **kwargs)
    elif query.is_cuda if compiled is None else compiled:
        out = _compiled_flex()(query, key, value, kernel_options=kernel_options, **kwargs)
    else:
        with warnings.catch_warnings():  # eager (unfused) flex is expected off CUDA
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = fa.flex_attention(query, key, value, **kwargs)
    if not return_lse:
        return out
    out, aux = out
    return out, (aux.lse if hasattr(aux, "lse") else aux)


def pool_tokens(x_img: torch.Tensor, height: int, width: int, spatial_weight: torch.Tensor) -> torch.Tensor:
    """Down-sample image keys or values ``[B, height*width, heads, D]`` over ``df x df``
    cells with the learned ``spatial_weight`` (stored as ``(1, 1, 1, df, 1, df, 1)``,
    i.e. one weight per (dy, dx) in a cell). Returns ``[B, (height/df)*(width/df), heads, D]``
    in row-major cell order."""
    df = spatial_weight.shape[3]
    b, _, heads, d = x_img.shape
    cells = x_img.reshape(b, height // df, df, width // df, df, heads, d)
    w = spatial_weight.reshape(1, 1, df, 1, df, 1, 1).to(x_img.dtype)
    return (cells * w).sum(dim=(2, 4)).reshape(b, -1, heads, d)


@dataclass
class _Plan:
    """Everything one layout needs, built once and reused by every layer."""

    layout: TokenLayout
    backend: str  # "dense" or "flex"
    mask: torch.Tensor | None = None  # dense: [Sq, Skv] bool, None when no masking is needed
    order: TileOrder | None = None  # flex
    to_flex: torch.Tensor | None = None  # flex: natural index of each tile-order query position
    from_flex: torch.Tensor | None = None  # flex: tile-order position of each natural token
    block_mask: object = None  # flex


class ClearAttention:
    """CLEAR attention for one model: window, backend, options, and a bounded cache of
    per-layout plans. Shared by all attention processors of a model."""

    def __init__(self, radius: float | None, down_factor: int = 1, backend: str = "auto",
                 proportional_attention: bool = False, tile: tuple[int, int] = (8, 16), cache_size: int = 8,
                 kernel_options: dict | None = None, training_tokens: int = 64 * 64 + 512):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if proportional_attention not in PROPORTIONAL:
            raise ValueError(f"proportional_attention must be one of {PROPORTIONAL}, got {proportional_attention!r}")
        self.window = Window(radius, down_factor)
        self.backend = backend
        self.proportional_attention = proportional_attention
        # L0 of the proportional scale: the model's training length (apply_clear passes its ModelSpec's); by hand
        # FLUX.1-dev's, 64x64 image tokens at 1024^2 + 512 text tokens
        self.training_tokens = training_tokens
        self.tile = tuple(tile)
        self.kernel_options = dict(kernel_options) if kernel_options else None  # FlexAttention's, on CUDA
        self.cache_size = cache_size
        self._plans: OrderedDict = OrderedDict()

    def __repr__(self):
        w = self.window
        return (f"ClearAttention(radius={w.radius}, down_factor={w.down_factor}, backend={self.backend!r}, "
                f"proportional_attention={self.proportional_attention})")

    # -- plans -------------------------------------------------------------------------

    def resolve_backend(self, device: torch.device, layout: TokenLayout | None = None, with_grad: bool = True) -> str:
        """The backend a call runs: ``dense``/``flex`` as asked; ``auto`` is flex on CUDA and, on
        CPU, flex for inference (``with_grad`` False) on a grid of at least
        :data:`CPU_FLEX_MIN_TOKENS` image tokens (compiled FlexAttention beats dense there), dense
        otherwise. Depends only on Python values, so it never breaks a compiled graph."""
        if self.backend != "auto":
            return self.backend
        if device.type == "cuda":
            return "flex"
        big = layout is not None and layout.num_image >= CPU_FLEX_MIN_TOKENS
        return "flex" if big and not with_grad and self.window.radius is not None else "dense"

    def layout_plan(self, layout: TokenLayout, device: torch.device, with_grad: bool) -> _Plan:
        """The plan a call with this layout runs (backend resolved), from the cache. Called
        outside compiled code by the model's forward pre-hook; its result is passed as ``plan=``."""
        backend = "dense" if self.window.radius is None else self.resolve_backend(device, layout, with_grad)
        return self.plan(layout, backend, device, with_grad and backend == "flex")

    def plan(self, layout: TokenLayout, backend: str, device: torch.device, with_grad: bool = False) -> _Plan:
        key = (layout, backend, str(device), with_grad)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        layout.pooled_grid(self.window)  # validates divisibility before any work
        if backend == "dense":
            needs_mask = self.window.masks_anything(layout.height, layout.width)
            plan = _Plan(layout, backend, mask=allowed_mask(layout, self.window, device) if needs_mask else None)
        else:
            order = TileOrder(layout, self.window, *self.tile)
            to_flex, from_flex = order.gather_indices(device)
            plan = _Plan(layout, backend, order=order, to_flex=to_flex, from_flex=from_flex,
                         block_mask=analytic_block_mask(order, device, with_q_blocks=with_grad))
        self._plans[key] = plan
        while len(self._plans) > self.cache_size:
            self._plans.popitem(last=False)
        return plan

    def scale(self, layout: TokenLayout, head_dim: int) -> float:
        """Softmax scale: ``1/sqrt(d)``, or with proportional attention
        ``sqrt(log_L0(N) / d)``, N = text + image tokens, L0 = the model's training length
        (FLUX.1 at 1024²: 64² + 512). For down-sampled variants (df > 1) the default
        (``True`` / ``"release"``) is the public release's ``sqrt(log_L0(10·N) / d)``;
        ``"plain"`` keeps ``log_L0(N)`` for them too."""
        if not self.proportional_attention:
            return 1.0 / math.sqrt(head_dim)
        n = layout.seq_len
        if self.proportional_attention != "plain" and self.window.down_factor > 1:
            n *= 10
        return math.sqrt(math.log(n) / math.log(self.training_tokens) / head_dim)

    # -- the call ----------------------------------------------------------------------

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                 spatial_weight: torch.Tensor | None = None, plan: _Plan | None = None) -> torch.Tensor:
        """``query/key/value``: ``[B, S, heads, D]`` in natural order; returns the same shape.
        ``plan``: this layout's :meth:`layout_plan`, built outside compiled code (default: looked up here)."""
        if query.shape[1] != layout.seq_len:
            raise ValueError(f"attention got {query.shape[1]} tokens but the layout {layout} has {layout.seq_len}")
        win = self.window
        layout.pooled_grid(win)
        if (spatial_weight is None) != (win.down_factor == 1):
            raise ValueError("spatial_weight must be given exactly when down_factor > 1")
        scale = self.scale(layout, query.shape[-1])
        if plan is None:
            with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            plan = self.layout_plan(layout, query.device, with_grad)
        elif plan.layout != layout:
            raise ValueError(f"the plan for {plan.layout} was handed to an attention call with layout {layout}")
        if win.radius is None or (plan.backend == "dense" and win.down_factor == 1):
            return self._dense(query, key, value, plan.mask, scale)

        img = layout.image_slice
        pooled_k = pooled_v = None
        if win.down_factor > 1:
            pooled_k = pool_tokens(key[:, img], layout.height, layout.width, spatial_weight)
            pooled_v = pool_tokens(value[:, img], layout.height, layout.width, spatial_weight)
        if plan.backend == "dense":
            return self._dense(query, torch.cat([key, pooled_k], 1), torch.cat([value, pooled_v], 1), plan.mask, scale)
        # auto chose flex for its compiled kernel's speed: use that kernel on CPU too
        return self._flex(query, key, value, pooled_k, pooled_v, layout, plan, scale, self.kernel_options,
                          compiled=query.is_cuda or self.backend == "auto")

    @staticmethod
    def _dense(q, k, v, mask, scale):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
        return out.transpose(1, 2)

    @staticmethod
    def _flex(q, k, v, pooled_k, pooled_v, layout, plan, scale, kernel_options=None, compiled=None):
        # one gather each into [image tiles (padded) | text] order, one gather back
        qf, kf, vf = (x.index_select(1, plan.to_flex) for x in (q, k, v))
        if pooled_k is not None:
            kf, vf = torch.cat([kf, pooled_k], 1), torch.cat([vf, pooled_v], 1)
        out = _flex(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), plan.block_mask, scale,
                    kernel_options, compiled=compiled)
        return out.transpose(1, 2).index_select(1, plan.from_flex)
