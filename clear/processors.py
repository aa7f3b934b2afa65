"""diffusers attention processors that route attention through :class:`ClearAttention`.

A processor does only what is specific to a model family: where the projections live
and how text and image tokens are laid out. The grid of image tokens reaches it with
each forward (``clear_grid``, added to ``joint_attention_kwargs`` by the hook that
:func:`clear.apply_clear` installs); the text length is whatever is left of the sequence.
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

    def __init__(self, core: ClearAttention):
        super().__init__()
        self.core = core
        df = core.window.down_factor
        if df > 1:
            self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, df, 1, df, 1), 1.0 / df**2))
        else:
            self.spatial_weight = None

    def extra_repr(self) -> str:
        return repr(self.core)

    @staticmethod
    def _check_call(attention_mask, clear_grid):
        if attention_mask is not None:
            raise ValueError("CLEAR defines its own attention pattern; an explicit attention_mask is not supported")
        if clear_grid is None:
            raise RuntimeError(
                "a CLEAR processor was called without the image grid of the forward; apply CLEAR to the whole model "
                "with clear.apply_clear(transformer, ...) rather than setting processors by hand"
            )


class FluxClearAttnProcessor(ClearProcessorBase):
    """CLEAR for ``FluxAttention`` (FLUX.1 transformer and ControlNet), double-stream
    blocks (separate text stream) and single-stream blocks (``[text | image]`` concatenated)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, clear_grid=None):
        self._check_call(attention_mask, clear_grid)
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

        height, width = clear_grid
        text_len = query.shape[1] - height * width
        if text_len < 0:
            raise ValueError(f"{query.shape[1]} tokens cannot hold a {height}x{width} image grid")
        layout = TokenLayout(text_len, height, width, text_first=True)
        out = self.core(query, key, value, layout, self.spatial_weight).flatten(2, 3).to(query.dtype)

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

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, clear_grid=None):
        self._check_call(attention_mask, clear_grid)
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

        height, width = clear_grid
        if n_image != height * width:
            raise ValueError(f"{n_image} image tokens cannot form the {height}x{width} grid of this forward")
        layout = TokenLayout(q.shape[1] - n_image, height, width, text_first=False)
        out = self.core(q, k, v, layout, self.spatial_weight).flatten(2, 3).to(q.dtype)

        out, enc_out = out[:, :n_image], out[:, n_image:]
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is None:
            return out
        if not attn.context_pre_only:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out
