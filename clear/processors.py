"""diffusers attention processors that route attention through :class:`ClearAttention`.

:class:`ClearProcessorBase` is the family-independent part of a processor; each family's
processor (``clear/families/flux.py``, ``sd3.py``) does only what is specific to the family:
where the projections live and how text and image tokens are laid out. The grid of image
tokens, and the plan of each attention layout, reach it with each forward through the model's
``ClearState`` (set by the hook that :func:`clear.apply_clear` installs, outside compiled code);
the text length is whatever is left of the sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import ClearAttention
from .geometry import TokenLayout


class ClearProcessorBase(nn.Module):
    """Holds the shared :class:`ClearAttention` and, for down-sampled variants, this
    module's learned pooling weights ``spatial_weight`` of shape ``(1, 1, 1, df, 1, df, 1)``
    (state-dict key ``<attention module>.processor.spatial_weight``, as released)."""

    def __init__(self, core: ClearAttention, state=None):
        super().__init__()
        self.core = core
        self.state = state  # the model's ClearState: grid and plans of the latest forward
        df = core.window.down_factor
        if df > 1:
            self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, df, 1, df, 1), 1.0 / df**2))
        else:
            self.spatial_weight = None

    def extra_repr(self) -> str:
        return repr(self.core)

    def _layout_and_plan(self, attention_mask, seq_len: int, text_first: bool):
        """This call's layout and the forward's plan for it. The layout is made of Python ints
        read through module attributes, so under ``torch.compile`` it is a guarded constant even
        when the sequence length is symbolic (the comparison guards on the length)."""
        if attention_mask is not None:
            raise ValueError("CLEAR defines its own attention pattern; an explicit attention_mask is not supported")
        state = self.state
        if state is None or state.grid is None:
            raise RuntimeError(
                "a CLEAR processor was called before any forward of its model, which gives it the image grid; apply "
                "CLEAR to the whole model with clear.apply_clear(transformer, ...) and call the model itself"
            )
        for plan in (state.plans or {}).values():
            if plan.layout.seq_len == seq_len:
                return plan.layout, plan
        height, width = state.grid
        if seq_len < height * width:
            raise ValueError(f"{seq_len} tokens cannot hold a {height}x{width} image grid")
        return TokenLayout(seq_len - height * width, height, width, text_first), None
