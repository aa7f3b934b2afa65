"""diffusers attention processors that route attention through :class:`ClearAttention`.

A processor does only what is specific to a model family: where the projections live
and how text and image tokens are laid out. The grid of image tokens, and the plan of each
attention layout, reach it with each forward through the model's ``ClearState`` (set by the
hook that :func:`clear.apply_clear` installs, outside compiled code); the text length is
whatever is left of the sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

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


class FluxClearAttnProcessor(ClearProcessorBase):
    """CLEAR for ``FluxAttention`` (FLUX.1 transformer and ControlNet), double-stream
    blocks (separate text stream) and single-stream blocks (``[text | image]`` concatenated)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
            value = torch.cat([enc_v.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        layout, plan = self._layout_and_plan(attention_mask, query.shape[1], text_first=True)
        text_len = layout.text_len
        out = self.core(query, key, value, layout, self.spatial_weight, plan).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        enc_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc_out.contiguous())


def _sd3_projections(attn, hidden_states, encoder_hidden_states):
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if encoder_hidden_states is None:
        return q, k, v, None, None, None
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        eq, ek, ev = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                      attn.add_v_proj(encoder_hidden_states))
    return q, k, v, eq, ek, ev


class SD3ClearAttnProcessor(ClearProcessorBase):
    """CLEAR for SD3 / SD3.5 ``Attention`` modules: joint attention (``[image | text]``, no
    RoPE) and SD3.5's image-only ``attn2`` of dual-attention blocks (pure local attention,
    plus pooled tokens when ``down_factor > 1``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v, eq, ek, ev = _sd3_projections(attn, hidden_states, encoder_hidden_states)

        def heads(t):
            return t.unflatten(-1, (attn.heads, -1))

        q, k, v = heads(q), heads(k), heads(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        n_image = q.shape[1]
        if encoder_hidden_states is not None:
            eq, ek, ev = heads(eq), heads(ek), heads(ev)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)

        layout, plan = self._layout_and_plan(attention_mask, q.shape[1], text_first=False)
        if n_image != layout.num_image:
            raise ValueError(f"{n_image} image tokens cannot form the {layout.height}x{layout.width} grid of this "
                             "forward")
        out = self.core(q, k, v, layout, self.spatial_weight, plan).flatten(2, 3).to(q.dtype)

        out, enc_out = out[:, :n_image], out[:, n_image:]
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is None:
            return out
        if not attn.context_pre_only:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out
