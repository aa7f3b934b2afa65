"""diffusers attention processors that route attention through :class:`ClearAttention`.

:class:`ClearProcessorBase` is the family-independent part of a processor; each family's
processor (``clear/families/flux.py``, ``sd3.py``, ...) does only what is specific to the family:
where the projections live and how text and image tokens are laid out. Families whose joint
sequence holds reference-image tokens or padded text (FLUX.2, Qwen-Image) describe it with an
:class:`Arrangement` and attend through :func:`attend_arranged`. The grid of image
tokens, and the plan of each attention layout, reach it with each forward through the model's
``ClearState`` (set by the hook that :func:`clear.apply_clear` installs, outside compiled code);
the text length is whatever is left of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ------------------------------------------------------------------------------------------
# Joint sequences that are not CLEAR's layout as they are: reference images, padded text
# ------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Group:
    """Batch rows ``rows`` that share one arrangement: ``order`` (the natural indices of CLEAR's
    ``[global | image]`` layout, ``text_len`` global tokens first), ``padded`` (natural indices of
    padded text tokens: queries only, no query sees them; ``None``: none) and ``inverse`` (where
    each natural token sits in ``[layout order | padded]``)."""

    rows: slice
    text_len: int
    order: torch.Tensor
    padded: torch.Tensor | None
    inverse: torch.Tensor


@dataclass(eq=False)
class Arrangement:
    """How one forward's joint sequence of ``seq_len`` tokens, ``[text | image | reference images]`` in
    the model's order, becomes CLEAR's ``[global | image]`` layout. Global tokens are the valid text
    tokens and every reference image's tokens: they see every key and every query sees them (a
    reference image is read like text: whole, wherever the output pixel is). Padded text tokens
    (Qwen-Image's ``encoder_hidden_states_mask``) are no one's keys. One :class:`Group` per run of batch
    rows with the same text mask."""

    seq_len: int
    groups: tuple[Group, ...]

    @property
    def text_lens(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(g.text_len for g in self.groups))

    @classmethod
    def build(cls, text_len: int, num_image: int, num_reference: int, text_mask: torch.Tensor | None = None,
              device=None):
        """``text_len`` text tokens (padded length), then ``num_image`` image tokens, then ``num_reference``
        reference tokens. ``text_mask`` ``[B, text_len]`` (True = a valid token) or ``None`` (all valid).
        ``None`` when the sequence already is the layout (no reference, no padding). Indices live on
        ``device`` (the call's tensors')."""
        if text_mask is not None:
            text_mask = text_mask.to(torch.bool)
            if bool(text_mask.all()):
                text_mask = None
        if text_mask is None and num_reference == 0:
            return None
        if text_mask is not None:
            text_mask = text_mask.to(device)
        seq_len = text_len + num_image + num_reference
        image = torch.arange(text_len, text_len + num_image, device=device)
        refs = torch.arange(text_len + num_image, seq_len, device=device)
        masks = [None] if text_mask is None else list(text_mask)
        groups, start = [], 0
        for b in range(1, len(masks) + 1):  # runs of rows with the same mask
            if b < len(masks) and torch.equal(masks[b], masks[start]):
                continue
            mask = masks[start]
            text = torch.arange(text_len, device=device)
            valid, padded = (text, None) if mask is None else (text[mask], text[~mask])
            if padded is not None and padded.numel() == 0:
                padded = None
            order = torch.cat([valid, refs, image])
            full = order if padded is None else torch.cat([order, padded])
            groups.append(Group(slice(start, b) if text_mask is not None else slice(None),
                                len(valid) + num_reference, order, padded, torch.argsort(full)))
            start = b
        return cls(seq_len, tuple(groups))


def attend_arranged(processor: ClearProcessorBase, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
    """CLEAR attention of one call whose ``[text | image | references]`` sequence (``[B, S, heads, D]``) the
    forward's :class:`Arrangement` describes (none: the sequence is the layout as it is); output in the
    call's order. Processors of families with reference images or padded text call this."""
    state = processor.state
    arrangement = getattr(state, "arrangement", None)
    if arrangement is None:
        layout, plan = processor._layout_and_plan(None, query.shape[1], text_first=True)
        return processor.core(query, key, value, layout, processor.spatial_weight, plan)
    if arrangement.seq_len != query.shape[1]:
        raise ValueError(f"an attention call of {query.shape[1]} tokens in a forward of {arrangement.seq_len}")
    height, width = state.grid
    covers = not processor.core.window.masks_anything(height, width)
    outs = []
    for g in arrangement.groups:
        if covers and g.padded is None:  # every query sees every key: the call's own order, as the model computes it
            layout = TokenLayout(g.text_len, height, width, True)
            outs.append(processor.core(query[g.rows], key[g.rows], value[g.rows], layout, processor.spatial_weight,
                                       (state.plans or {}).get(g.text_len)))
            continue
        q, k, v = (x[g.rows].index_select(1, g.order) for x in (query, key, value))
        layout = TokenLayout(g.text_len, height, width, True)
        plan = (state.plans or {}).get(g.text_len)
        out = processor.core(q, k, v, layout, processor.spatial_weight, plan)
        if g.padded is not None:
            out = torch.cat([out, processor.core.text_queries(query[g.rows].index_select(1, g.padded), k, v,
                                                               layout).to(out.dtype)], 1)
        outs.append(out.index_select(1, g.inverse))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
