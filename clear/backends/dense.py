"""The ``dense`` backend: a boolean mask from :mod:`clear.geometry` + ``scaled_dot_product_attention``.

Runs everywhere, has a backward, plans full attention too: the oracle every other backend is
tested against. With ``return_lse`` it computes explicit float32 logits, a few heads at a time.
Tensors are ``[B, S, heads, D]``; see :mod:`clear.backends.base` for the plan interface. Registered as
:data:`BACKEND` at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import BandLayout, TokenLayout, Window, allowed_mask, band_allowed_mask
from .base import REFERENCE, Backend, Options

# Logits materialised at once by the log-sum-exp path (heads are taken in chunks below it).
MAX_LOGITS = 2**26
# Masks up to this many elements also keep an additive float32 copy (0 / -inf), built once with the plan:
# SDPA would otherwise turn the boolean mask into one on every call (a third of a small model's attention time).
MAX_BIAS = 2**22


@dataclass
class Plan:
    """A boolean mask ``[queries, keys]`` (``None`` when every query sees every key) and, for small masks, the
    same as an additive float32 ``bias``."""

    layout: TokenLayout | BandLayout
    mask: torch.Tensor | None = None
    backend: str = "dense"
    bias: torch.Tensor | None = None

    def __post_init__(self):
        if self.mask is not None and self.bias is None and self.mask.numel() <= MAX_BIAS:
            self.bias = torch.zeros(self.mask.shape, device=self.mask.device).masked_fill_(~self.mask, float("-inf"))

    def attend(self, query, key, value, scale: float, return_lse: bool = False):
        if not return_lse and self.bias is not None and self.bias.dtype == query.dtype:
            return attend(query, key, value, scale, mask=self.bias)
        return attend(query, key, value, scale, return_lse=return_lse, mask=self.mask)


def grid_plan(layout: TokenLayout, window: Window, device, options: Options = Options(), with_grad: bool = False):
    needs_mask = window.masks_anything(layout.height, layout.width, layout.frames)
    return Plan(layout, allowed_mask(layout, window, device) if needs_mask else None)


def band_plan(band: BandLayout, window: Window, device, options: Options = Options()):
    win = Window(window.radius)  # pooled keys are counted by the band itself
    if win.covers(band.ext_rows, band.width):
        return Plan(band)
    return Plan(band, band_allowed_mask(band.rows, band.width, band.above, band.ext_rows, win, band.text_len,
                                        band.n_pooled, device))


def attend(query, key, value, scale: float, *, return_lse: bool = False, options: Options = Options(), mask=None,
           max_logits: int = MAX_LOGITS):
    """Softmax attention of ``query [B, Sq, H, D]`` on ``key/value [B, Sk, H, D]``, ``mask``
    ``[Sq, Sk]`` bool, or an additive float mask without ``return_lse`` (``None``: no mask). ``return_lse``:
    ``(out, lse)`` in float32."""
    if not return_lse:
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
        return out.transpose(1, 2)
    b, tq, heads, _ = query.shape
    step = max(1, max_logits // max(1, b * tq * key.shape[1]))
    outs, lses = [], []
    for h in range(0, heads, step):
        qh, kh, vh = (t[:, :, h : h + step].transpose(1, 2).float() for t in (query, key, value))
        logits = (qh @ kh.transpose(-1, -2)) * scale  # [B, h, Sq, Sk]
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        lse = logits.logsumexp(-1)
        outs.append((logits - lse[..., None]).exp() @ vh)
        lses.append(lse)
    return torch.cat(outs, 1).transpose(1, 2), torch.cat(lses, 1).transpose(1, 2)


# Its registration: runs everywhere, with a backward, full attention and pooled keys (the defaults).
BACKEND = Backend(REFERENCE, "boolean mask + scaled_dot_product_attention; the oracle", grid_plan, band_plan, attend)
