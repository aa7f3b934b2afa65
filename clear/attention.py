"""The one CLEAR attention entry point every processor calls.

:class:`ClearAttention` takes ``q, k, v`` of one attention call in the model's natural
token order (``[B, S, heads, head_dim]``, as diffusers' processors hold them), and
returns the attention output in the same order. It owns the backend choice, the softmax
scale and ONE bounded cache of plans (whole grids and patch-parallel bands); it holds no
model weights (``spatial_weight`` belongs to the processor of each attention module and is
passed in).

Backends live in :mod:`clear.backends`, one file each, registered with where they run:

* ``"dense"``: boolean mask + ``scaled_dot_product_attention``. Runs everywhere,
  supports backward; the oracle every fast path is tested against.
* ``"flex"``: FlexAttention over image tokens reordered into compact tiles, with a
  block mask built analytically from tile geometry. Compiled on CUDA.
* ``"tiled"``: query tiles with their gathered key windows in one batched SDPA; a backward
  everywhere.
* ``"auto"``: decided per call shape by :func:`clear.backends.decide`, from shipped
  measurements where the device has them (CPU), else by the table's rule (``flex`` on CUDA);
  each plan logs once which backend it runs and why.

:meth:`ClearAttention.plan` is the one function that answers "what runs here?" (layout, device,
backward -> plan: the backend and the reason chosen by :func:`clear.backends.decide`, the plan built by
the backend's own function, logged once, cached per layout). Under ``torch.compile`` the plan of each
layout is built outside the traced code (by the forward pre-hook of :func:`clear.apply_clear`, which
dynamo does not trace) and handed in with ``plan=``; the traced call only reads its tensors.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import torch

from . import backends
from .backends import Call, Options
from .backends import dense as reference_backend  # backends.REFERENCE, imported here: compiled code cannot import
from .geometry import BandLayout, TokenLayout, Window

__all__ = ["ClearAttention", "pool_tokens", "PROPORTIONAL"]

logger = logging.getLogger(__name__)

# proportional_attention: False (1/sqrt(d)), True = "release" (the public release's scale: log_L0(10·N) for
# down-sampled variants, log_L0(N) otherwise) or "plain" (log_L0(N) for every variant)
PROPORTIONAL = (False, True, "release", "plain")
# L0 of the proportional scale when none is given: FLUX.1's 64² image + 512 text tokens at 1024²
# (clear.apply_clear passes the model family's own).
DEFAULT_TRAINING_TOKENS = 64 * 64 + 512


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


class ClearAttention:
    """CLEAR attention for one model: window, backend, options, and a bounded cache of
    plans (whole grids and patch-parallel bands). Shared by all attention processors of a model."""

    def __init__(self, radius: float | None, down_factor: int = 1, backend: str = "auto",
                 proportional_attention: bool = False, tile: tuple[int, int] = (8, 16), cache_size: int = 8,
                 kernel_options: dict | None = None, training_tokens: int = DEFAULT_TRAINING_TOKENS,
                 temporal_radius: float | None = None):
        if backend not in backends.choices():
            raise ValueError(f"backend must be one of {backends.choices()}, got {backend!r}")
        if proportional_attention not in PROPORTIONAL:
            raise ValueError(f"proportional_attention must be one of {PROPORTIONAL}, got {proportional_attention!r}")
        self.window = Window(radius, down_factor, temporal_radius)  # temporal_radius: video layouts only
        self.backend = backend
        self.proportional_attention = proportional_attention
        # L0 of the proportional scale: the model's training length (apply_clear passes its ModelSpec's); by hand
        # FLUX.1-dev's, 64x64 image tokens at 1024^2 + 512 text tokens
        self.training_tokens = training_tokens
        self.tile = tuple(tile)
        self.kernel_options = dict(kernel_options) if kernel_options else None  # FlexAttention's, on CUDA
        self.cache_size = cache_size
        self._plans: OrderedDict = OrderedDict()
        # the model's attention heads and head size, for auto's choice (clear.apply_clear reads them)
        self.heads: int | None = None
        self.head_dim: int | None = None
        # flex's compiled kernel off CUDA: None = when ``auto`` chose flex (benchmarks set True for ``flex``)
        self.compile_kernels: bool | None = None

    def __repr__(self):
        w = self.window
        rt = "" if w.temporal_radius is None else f", temporal_radius={w.temporal_radius}"
        return (f"ClearAttention(radius={w.radius}{rt}, down_factor={w.down_factor}, backend={self.backend!r}, "
                f"proportional_attention={self.proportional_attention})")

    # -- plans -------------------------------------------------------------------------

    def options(self, device: torch.device) -> Options:
        """What every plan of this core gets: the tile, the kernel options, and whether flex runs
        its compiled kernel off CUDA (``auto`` chose it for that kernel's speed)."""
        compiled = self.compile_kernels
        if compiled is None:
            compiled = torch.device(device).type == "cuda" or self.backend == "auto"
        return Options(self.tile, self.kernel_options, compiled=compiled)

    def plan(self, layout: TokenLayout | BandLayout, device: torch.device, with_grad: bool = False,
             heads: int | None = None, head_dim: int | None = None):
        """The plan of a call with this layout (a whole grid, :class:`TokenLayout`, or a patch-parallel band,
        :class:`BandLayout`) on ``device``, with a backward or not: the one function that answers "what runs
        here?". :func:`clear.backends.decide` chooses the backend and says why (heads and head size: the ones
        given, else those :func:`clear.apply_clear` read from the model); :meth:`Backend.plan` builds the plan
        the first time (checking the layout), logging once which backend runs it and why; the bounded cache
        keeps the ``cache_size`` latest. Called outside compiled code (by the model's forward pre-hook, whose
        plans reach every processor with the forward); its result goes to :meth:`__call__` as ``plan=``."""
        device = torch.device(device)
        w = self.window
        image, text = ((layout.num_queries, layout.text_len) if isinstance(layout, BandLayout)
                       else (layout.num_image, layout.text_len))
        call = Call(device.type, image, text, w.radius, w.down_factor, heads or self.heads, head_dim or self.head_dim,
                    with_grad)
        name, why = backends.decide(self.backend, call)
        backend = backends.get(name)
        with_grad = with_grad and backend.backward_plans  # else one plan serves training and inference alike
        options = self.options(device)
        key = (layout, name, str(device), with_grad, options)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = backend.plan(layout, w, device, options, with_grad)
        logger.info("CLEAR attention: %s runs %r: %s", call.describe(), name, why)
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

    def text_queries(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     layout: TokenLayout) -> torch.Tensor:
        """Attention of queries that are not tokens of ``layout`` but follow its text rule: every key of the
        layout (``key/value`` ``[B, layout.seq_len, heads, D]`` in the layout's order), no pooled key; the scale
        of the layout. These are padded text tokens (Qwen-Image), which no query sees as keys but which still
        query. Unmasked attention, so the reference backend's (``dense``) serves every backend."""
        if key.shape[1] != layout.seq_len:
            raise ValueError(f"text queries got {key.shape[1]} keys but the layout {layout} has {layout.seq_len}")
        scale = self.scale(layout, query.shape[-1])
        return reference_backend.attend(query, key, value, scale)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                 spatial_weight: torch.Tensor | None = None, plan=None) -> torch.Tensor:
        """CLEAR attention of one call.

        Args:
            query, key, value: ``[B, S, heads, D]``, the layout's tokens in natural order.
            layout: where text and image tokens sit (``S == layout.seq_len``).
            spatial_weight: the processor's pooling weights ``(1, 1, 1, df, 1, df, 1)``, exactly when
                ``down_factor > 1``.
            plan: this layout's :meth:`plan`, built outside compiled code (``None``: looked up here).

        Returns ``[B, S, heads, D]``, in natural order."""
        if query.shape[1] != layout.seq_len:
            raise ValueError(f"attention got {query.shape[1]} tokens but the layout {layout} has {layout.seq_len}")
        win = self.window
        if (spatial_weight is None) != (win.down_factor == 1):
            raise ValueError("spatial_weight must be given exactly when down_factor > 1")
        scale = self.scale(layout, query.shape[-1])
        if plan is None:
            with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            plan = self.plan(layout, query.device, with_grad, query.shape[2], query.shape[3])
        elif plan.layout != layout:
            raise ValueError(f"the plan for {plan.layout} was handed to an attention call with layout {layout}")
        if win.down_factor > 1:  # keys and values: [natural order | pooled]
            img = layout.image_slice
            rows = layout.frames * layout.height  # a video's frames stacked: df x df cells never cross frames
            key = torch.cat([key, pool_tokens(key[:, img], rows, layout.width, spatial_weight)], 1)
            value = torch.cat([value, pool_tokens(value[:, img], rows, layout.width, spatial_weight)], 1)
        return plan.attend(query, key, value, scale)
