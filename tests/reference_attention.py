"""An independent oracle for the FLUX.2 and Qwen-Image families: diffusers' own processors (0.42.1:
``Flux2AttnProcessor``, ``Flux2ParallelSelfAttnProcessor``, ``QwenDoubleStreamAttnProcessor2_0``) copied
line by line, with their attention call replaced by SDPA on an explicit boolean mask written here from
the rule CLEAR documents (nothing of clear.geometry, clear.processors or clear.backends is used):

* global tokens (valid text tokens and every reference image's tokens) are seen by every query and see
  every key except the pooled ones;
* an output-image query sees the output-image keys at (dy, dx) with dy^2 + dx^2 < r^2, every global key
  and every pooled key (df x df cells of image keys and values weighted by the module's ``spatial_weight``);
* padded text tokens (Qwen-Image's ``encoder_hidden_states_mask``) are no query's key; as queries they see
  what a text query sees.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Pattern:
    """One forward's tokens: ``text`` text tokens (``valid``: ``[B, text]`` bool, None = all), the
    ``height x width`` output image after them, then ``refs`` reference tokens; the window; ``scale``
    None = 1/sqrt(d), else ``L0`` of the proportional scale sqrt(log_L0(N) / d) with N the call's length
    less its padded text tokens."""

    text: int
    height: int
    width: int
    refs: int = 0
    radius: float | None = None
    down_factor: int = 1
    valid: torch.Tensor | None = None
    proportional_l0: int | None = None

    def mask(self, batch: int) -> torch.Tensor:
        """``[B, 1, S, S + pooled]``: True = the query sees the key."""
        t, h, w, df = self.text, self.height, self.width, self.down_factor
        n = h * w
        s = t + n + self.refs
        pooled = (h // df) * (w // df) if df > 1 else 0
        valid = torch.ones(batch, t, dtype=torch.bool) if self.valid is None else self.valid.bool()
        is_image = torch.zeros(s, dtype=torch.bool)
        is_image[t:t + n] = True
        out = torch.zeros(batch, s, s + pooled, dtype=torch.bool)
        for b in range(batch):
            key_global = torch.ones(s, dtype=torch.bool)
            key_global[t:t + n] = False
            key_global[:t] = valid[b]
            m = torch.zeros(s, s + pooled, dtype=torch.bool)
            m[:, :s] = key_global[None, :]  # everyone sees the global keys
            m[~is_image, t:t + n] = True  # text, padded text and reference queries see the image
            for qi in range(n):
                qy, qx = divmod(qi, w)
                for ki in range(n):
                    ky, kx = divmod(ki, w)
                    d2 = (qy - ky) ** 2 + (qx - kx) ** 2
                    m[t + qi, t + ki] = self.radius is None or d2 < self.radius**2
            m[t:t + n, s:] = True  # image queries see the pooled keys
            out[b] = m
        return out[:, None]

    def scale(self, head_dim: int, batch_row: int = 0) -> float:
        if self.proportional_l0 is None:
            return 1.0 / math.sqrt(head_dim)
        valid = self.text if self.valid is None else int(self.valid[batch_row].sum())
        n = valid + self.height * self.width + self.refs
        return math.sqrt(math.log(n) / math.log(self.proportional_l0) / head_dim)


def masked_attention(pattern: Pattern, query, key, value, spatial_weight=None):
    """SDPA of ``[B, S, heads, D]`` tensors on ``pattern``'s mask; the pooled keys and values are appended."""
    b = query.shape[0]
    if pattern.down_factor > 1:
        t, h, w, df = pattern.text, pattern.height, pattern.width, pattern.down_factor
        weight = spatial_weight.reshape(df, df)

        def pool(x):
            img = x[:, t:t + h * w].reshape(b, h // df, df, w // df, df, *x.shape[2:])
            cells = torch.einsum("bydxe...,de->byx...", img, weight.to(x.dtype))
            return torch.cat([x, cells.reshape(b, -1, *x.shape[2:])], 1)

        key, value = pool(key), pool(value)
    mask = pattern.mask(b).to(query.device)
    outs = []
    for row in range(b):  # the proportional scale may differ by row (Qwen-Image's padding)
        q, k, v = (x[row:row + 1].transpose(1, 2) for x in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[row:row + 1],
                                                   scale=pattern.scale(query.shape[-1], row)).transpose(1, 2))
    return torch.cat(outs, 0)


class ReferenceFlux2Processor:
    """diffusers 0.42.1 ``Flux2AttnProcessor`` and ``Flux2ParallelSelfAttnProcessor``, attention on the mask."""

    def __init__(self, pattern: Pattern, spatial_weight=None):
        self.pattern, self.spatial_weight = pattern, spatial_weight

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if hasattr(attn, "to_qkv_mlp_proj"):
            return self.single(attn, hidden_states, *args, **kwargs)
        return self.double(attn, hidden_states, *args, **kwargs)

    def double(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = masked_attention(self.pattern, query, key, value, self.spatial_weight).flatten(2, 3).to(query.dtype)
        t = encoder_hidden_states.shape[1]
        enc, out = out[:, :t], out[:, t:]
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(enc)

    def single(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = hidden_states.split([3 * attn.inner_dim, hidden_states.shape[-1] - 3 * attn.inner_dim], -1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = masked_attention(self.pattern, query, key, value, self.spatial_weight).flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class ReferenceQwenProcessor:
    """diffusers 0.42.1 ``QwenDoubleStreamAttnProcessor2_0``, attention on the mask (whose padded text keys
    are the ones ``encoder_hidden_states_mask`` hides)."""

    def __init__(self, pattern: Pattern, spatial_weight=None):
        self.pattern, self.spatial_weight = pattern, spatial_weight

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.unflatten(-1, (-1, head_dim))

        iq, ik, iv = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        tq, tk, tv = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                      heads(attn.add_v_proj(encoder_hidden_states)))
        iq, ik, tq, tk = attn.norm_q(iq), attn.norm_k(ik), attn.norm_added_q(tq), attn.norm_added_k(tk)
        img_freqs, txt_freqs = image_rotary_emb
        iq, ik = apply_rotary_emb_qwen(iq, img_freqs, use_real=False), apply_rotary_emb_qwen(ik, img_freqs, use_real=False)
        tq, tk = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False), apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        q, k, v = torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1)
        out = masked_attention(self.pattern, q, k, v, self.spatial_weight).flatten(2, 3).to(q.dtype)
        t = encoder_hidden_states.shape[1]
        txt, img = out[:, :t], out[:, t:]
        return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(txt.contiguous())


def reference_model(model, processor_cls, pattern: Pattern, clear_model=None):
    """A copy of the stock ``model`` whose every attention runs ``processor_cls`` on ``pattern``, with the
    ``spatial_weight`` of the same module of ``clear_model`` (a CLEAR model of the same weights)."""
    ref = copy.deepcopy(model)
    procs = {}
    for name in ref.attn_processors:
        sw = None
        if clear_model is not None:
            sw = getattr(clear_model.get_submodule(name.rsplit(".processor", 1)[0]).processor, "spatial_weight", None)
        procs[name] = processor_cls(pattern, None if sw is None else sw.detach())
    ref.set_attn_processor(procs)
    return ref


# ------------------------------------------------------------------------------------------
# Wan: diffusers' own processor with an explicit 3-D mask
# ------------------------------------------------------------------------------------------

def video_window_mask(frames: int, height: int, width: int, radius, temporal_radius, df: int = 1) -> torch.Tensor:
    """``[N, N + pooled]`` bool, N = frames x height x width (frame-major): query (t, y, x) sees key (t', y', x')
    iff ((t-t')/rt)^2 + ((y-y')/r)^2 + ((x-x')/r)^2 < 1 in exact rational arithmetic (rt None: every frame;
    radius None: everything); every query sees every pooled key (df x df cells of each frame)."""
    from fractions import Fraction

    n = frames * height * width
    pos = torch.arange(n)
    t, y, x = pos // (height * width), (pos // width) % height, pos % width
    dt = (t[:, None] - t[None]).abs()
    d2 = (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2
    table = torch.zeros(frames, int(d2.max()) + 1, dtype=torch.bool)  # [dt, d2]: the rule, one value at a time
    for a in range(frames):
        for b in range(table.shape[1]):
            if radius is None:
                table[a, b] = True
                continue
            time = 0 if temporal_radius is None else Fraction(a * a) / Fraction(temporal_radius) ** 2
            table[a, b] = time + Fraction(b) / Fraction(radius) ** 2 < 1
    pooled = frames * (height // df) * (width // df) if df > 1 else 0
    return torch.cat([table[dt, d2], torch.ones(n, pooled, dtype=torch.bool)], 1)


class ReferenceWanProcessor:
    """diffusers' ``WanAttnProcessor`` for self-attention (0.42.1, its self-attention path copied line by line) with
    SDPA on an explicit boolean ``mask`` ``[N, N + pooled]``; with ``spatial_weight`` ``[df, df]`` the pooled keys
    and values (each frame's ``df x df`` cells of the rotated keys and of the values, weighted) follow the video's.
    Without pooling, :meth:`diffusers_own` is diffusers' processor itself, given the mask."""

    def __init__(self, mask, grid, spatial_weight=None):
        self.mask, self.grid = mask, grid
        self.spatial_weight = spatial_weight

    @staticmethod
    def diffusers_own(mask):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        class Masked(WanAttnProcessor):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
                assert encoder_hidden_states is None and attention_mask is None
                return super().__call__(attn, hidden_states, None, mask, rotary_emb)

        return Masked()

    def _pool(self, x):
        frames, height, width = self.grid
        w = self.spatial_weight
        df = w.shape[0]
        b, _, heads, d = x.shape
        x = x.reshape(b, frames, height, width, heads, d)
        out = sum(w[i, j] * x[:, :, i::df, j::df] for i in range(df) for j in range(df))
        return out.reshape(b, -1, heads, d)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
            x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
            cos = freqs_cos[..., 0::2]
            sin = freqs_sin[..., 1::2]
            out = torch.empty_like(hidden_states)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x1 * sin + x2 * cos
            return out.type_as(hidden_states)

        query = apply_rotary_emb(query, *rotary_emb)
        key = apply_rotary_emb(key, *rotary_emb)
        if self.spatial_weight is not None:
            key = torch.cat([key, self._pool(key)], 1)
            value = torch.cat([value, self._pool(value)], 1)
        hidden_states = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                       value.transpose(1, 2), attn_mask=self.mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
