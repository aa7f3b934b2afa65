"""diffusers attention processors that route attention through :class:`ClearAttention`.

:class:`ClearProcessorBase` is the family-independent part of a processor; each family's
processor (``clear/families/flux.py``, ``sd3.py``, ...) does only what is specific to the family:
where the projections live and how text and image tokens are laid out. Families whose joint
sequence holds reference-image tokens or padded text (FLUX.2, Qwen-Image) describe it with an
:class:`Arrangement` and attend through :func:`attend_arranged`.

What one forward's attention calls share, its image grid and the plan of each attention layout, is a
:class:`ForwardPlan` made by the hook that :func:`clear.apply_clear` installs (from that forward's own inputs,
outside compiled code). It travels with the forward as the keyword argument ``clear_forward`` of every
processor call (diffusers hands a model's ``joint_attention_kwargs`` / ``attention_kwargs`` to every
processor), so blocks that gradient checkpointing re-runs in the backward get their own forward's, never
the latest one's; the text length of a call is whatever its sequence leaves beside the grid. A model whose
forward hands its blocks no attention kwargs (FLUX.1's ControlNet, Wan) shares it through :class:`InProgress`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import ClearAttention
from .geometry import TokenLayout

# The keyword argument that carries a forward's ForwardPlan to every processor call.
FORWARD_KWARG = "clear_forward"


class ForwardPlan(nn.Module):
    """What every attention call of one forward uses: the image ``grid`` (tokens per axis, ``(height,
    width)``, a video's ``(frames, height, width)``), whether text comes first (``text_first``), the plan of each
    attention layout by its text length (``plans``, read only; a plan ``None``: the attention makes its own, as
    patch parallelism's bands do) and, where the joint sequence is not ``[text | image]`` as it is, its
    :class:`Arrangement`.

    An ``nn.Module`` for ``torch.compile`` only (it holds no parameter and no model registers it): dynamo
    specialises the ints and tensor shapes it reaches through a module, so each resolution gets its own
    static graph; through a plain object handed in as an argument they would turn symbolic at the second
    resolution."""

    def __init__(self, grid: tuple[int, ...], text_first: bool, plans: dict | None = None,
                 arrangement: Arrangement | None = None):
        super().__init__()
        self.grid = tuple(grid)
        self.text_first = text_first
        self.plans = dict(plans or {})
        self.arrangement = arrangement

    def extra_repr(self) -> str:
        return f"grid={self.grid}, text_lens={tuple(self.plans)}, arranged={self.arrangement is not None}"

    @property
    def num_image(self) -> int:
        return math.prod(self.grid)

    def token_layout(self, text_len: int) -> TokenLayout:
        """The layout of ``text_len`` text tokens beside this forward's grid: ``(height, width)`` an image,
        ``(frames, height, width)`` a video (a video family's grid, frame-major)."""
        if len(self.grid) == 3:
            frames, height, width = self.grid
            return TokenLayout(text_len, height, width, self.text_first, frames)
        return TokenLayout(text_len, *self.grid, self.text_first)

    def layout(self, seq_len: int) -> tuple[TokenLayout, object]:
        """The layout of an attention call of ``seq_len`` tokens in this forward, and its plan (``None`` where the
        forward planned no layout of that length: the call plans its own). The comparison of lengths is a
        guard under ``torch.compile``, so the layout's ints are constants of the graph."""
        n_image = self.num_image
        for text_len, plan in self.plans.items():
            if text_len + n_image == seq_len:
                return self.token_layout(text_len), plan
        if seq_len < n_image:
            raise ValueError(f"{seq_len} tokens cannot hold a {'x'.join(map(str, self.grid))} image grid")
        return self.token_layout(seq_len - n_image), None


@dataclass(eq=False)
class InProgress:
    """The :class:`ForwardPlan` of the forward in progress (``None`` between forwards), for a model whose
    diffusers forward hands no attention kwargs to its blocks (FLUX.1's ControlNet, Wan): its pre-hook sets it and
    a forward hook clears it. Right for every call made inside that forward; for a block that gradient
    checkpointing re-runs in the backward, the model's checkpointing function is wrapped (:meth:`replaying`) so
    that the re-run sets its own forward's plan again while it runs."""

    plan: ForwardPlan | None = None

    def replaying(self, checkpoint_func):
        """``checkpoint_func`` (diffusers' ``model._gradient_checkpointing_func(block, *args)``), wrapped so that a
        block it runs, in the forward and again in the backward, runs with the plan of the forward that called it."""
        if isinstance(checkpoint_func, _ReplayPlan) and checkpoint_func.in_progress is self:
            return checkpoint_func
        return _ReplayPlan(checkpoint_func, self)


@dataclass(eq=False)
class _ReplayPlan:
    """A gradient checkpointing function (``func(block, *args)``) whose blocks run with the plan of the forward
    in progress when it was called (:meth:`InProgress.replaying`); ``func`` is the wrapped one."""

    func: Callable
    in_progress: InProgress

    def __call__(self, block, *args, **kwargs):
        return self.func(functools.partial(_run_with_plan, self.in_progress, self.in_progress.plan, block), *args,
                         **kwargs)


def _run_with_plan(in_progress: InProgress, plan: ForwardPlan | None, block, *args, **kwargs):
    """``block(*args, **kwargs)`` with ``plan`` as the forward in progress (the one before it restored after)."""
    before, in_progress.plan = in_progress.plan, plan
    try:
        return block(*args, **kwargs)
    finally:
        in_progress.plan = before


class ClearProcessorBase(nn.Module):
    """Holds the shared :class:`ClearAttention` and, for down-sampled variants, this
    module's learned pooling weights ``spatial_weight`` of shape ``(1, 1, 1, df, 1, df, 1)``
    (state-dict key ``<attention module>.processor.spatial_weight``, as released)."""

    def __init__(self, core: ClearAttention, in_progress: InProgress | None = None):
        super().__init__()
        self.core = core
        self.in_progress = in_progress  # read only where a call comes without its forward's plan
        df = core.window.down_factor
        if df > 1:
            self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, df, 1, df, 1), 1.0 / df**2))
        else:
            self.spatial_weight = None

    def extra_repr(self) -> str:
        return repr(self.core)

    def forward_plan(self, clear_forward: ForwardPlan | None) -> ForwardPlan:
        """The :class:`ForwardPlan` of the forward this call belongs to: the one handed in with the call, else (a
        model whose forward hands no attention kwargs to its blocks) the forward in progress."""
        if clear_forward is not None:
            return clear_forward
        running = self.in_progress.plan if self.in_progress is not None else None
        if running is None:
            raise RuntimeError(
                "a CLEAR processor was called outside a forward of its model, which gives it the image grid; apply "
                "CLEAR to the whole model with clear.apply_clear(transformer, ...) and call the model itself"
            )
        return running

    def _layout_and_plan(self, clear_forward: ForwardPlan | None, attention_mask, seq_len: int):
        """This call's layout and its forward's plan for it."""
        if attention_mask is not None:
            raise ValueError("CLEAR defines its own attention pattern; an explicit attention_mask is not supported")
        return self.forward_plan(clear_forward).layout(seq_len)


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
                    value: torch.Tensor, clear_forward: ForwardPlan | None) -> torch.Tensor:
    """CLEAR attention of one call whose ``[text | image | references]`` sequence (``[B, S, heads, D]``) the
    forward's :class:`Arrangement` describes (none: the sequence is the layout as it is); output in the
    call's order. Processors of families with reference images or padded text call this."""
    forward = processor.forward_plan(clear_forward)
    arrangement = forward.arrangement
    if arrangement is None:
        layout, plan = forward.layout(query.shape[1])
        return processor.core(query, key, value, layout, processor.spatial_weight, plan)
    if arrangement.seq_len != query.shape[1]:
        raise ValueError(f"an attention call of {query.shape[1]} tokens in a forward of {arrangement.seq_len}")
    covers = not processor.core.window.masks_anything(*forward.grid)
    outs = []
    for g in arrangement.groups:
        layout = TokenLayout(g.text_len, *forward.grid, True)
        plan = forward.plans.get(g.text_len)
        if covers and g.padded is None:  # every query sees every key: the call's own order, as the model computes it
            outs.append(processor.core(query[g.rows], key[g.rows], value[g.rows], layout, processor.spatial_weight,
                                       plan))
            continue
        q, k, v = (x[g.rows].index_select(1, g.order) for x in (query, key, value))
        out = processor.core(q, k, v, layout, processor.spatial_weight, plan)
        if g.padded is not None:
            out = torch.cat([out, processor.core.text_queries(query[g.rows].index_select(1, g.padded), k, v,
                                                               layout).to(out.dtype)], 1)
        outs.append(out.index_select(1, g.inverse))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
