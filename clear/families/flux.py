"""FLUX.1 (dev, schnell; FluxTransformer2DModel and FluxControlNetModel), and the mini model of ``ckpt/mini``.

Everything CLEAR knows about the family: its attention processor (double-stream blocks with a
separate text stream, single-stream blocks with ``[text | image]`` concatenated), how a forward
gives the image grid (``img_ids``), the released models (:data:`SPECS`: sampling defaults, T5
length, training length L0), block streams and checkpoint block names, encoders and transformer
inputs (CLIP pooled + T5 text, 2x2-packed latents with RoPE ids, timestep in [0, 1], guidance as an
embedding on dev), size rules (16 pixels per token, no position table), the pipelines, and
NTK-scaled RoPE for resolution extrapolation (:class:`NTKFluxPosEmbed`, :func:`ntk_rope`).

diffusers' FLUX modules are imported where they are used, so that importing the registry (a
command line's ``--model_family`` choices) does not import every diffusers transformer.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ..geometry import grid_from_ids
from ..processors import ClearProcessorBase
from .base import ModelFamily, ModelSpec


def joint_heads(attn, qkv, enc_qkv, image_rotary_emb):
    """FLUX's (and FLUX.2's) step after the projections: heads, q/k norms, the text stream's q/k/v first
    (double-stream blocks), RoPE; ``[B, S, heads, D]`` each, as diffusers' processors hold them."""
    from diffusers.models.embeddings import apply_rotary_emb  # here: the registry imports no diffusers model

    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv)
    query, key = attn.norm_q(query), attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        enc_q, enc_k, enc_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in enc_qkv)
        query = torch.cat([attn.norm_added_q(enc_q), query], dim=1)
        key = torch.cat([attn.norm_added_k(enc_k), key], dim=1)
        value = torch.cat([enc_v, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


class FluxClearAttnProcessor(ClearProcessorBase):
    """CLEAR for ``FluxAttention`` (FLUX.1 transformer and ControlNet), double-stream
    blocks (separate text stream) and single-stream blocks (``[text | image]`` concatenated)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, clear_forward=None):
        # here: the registry imports no diffusers model
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = joint_heads(attn, (query, key, value), (enc_q, enc_k, enc_v), image_rotary_emb)

        layout, plan = self._layout_and_plan(clear_forward, attention_mask, query.shape[1])
        text_len = layout.text_len
        out = self.core(query, key, value, layout, self.spatial_weight, plan).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        enc_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc_out.contiguous())


# ------------------------------------------------------------------------------------------
# NTK-scaled RoPE (resolution extrapolation)
# ------------------------------------------------------------------------------------------

class NTKFluxPosEmbed(torch.nn.Module):
    """FLUX's rotary embedding (diffusers' ``FluxPosEmbed``: same ``theta``, ``axes_dim`` and output)
    with NTK-aware scaling: the base ``theta`` of every axis is multiplied by ``ntk_factor``
    (diffusers' ``get_1d_rotary_pos_embed(..., ntk_factor=)``), which stretches the wavelengths so
    that positions beyond the training grid stay in range."""

    def __init__(self, theta: int, axes_dim, ntk_factor: float):
        super().__init__()
        self.theta, self.axes_dim, self.ntk_factor = theta, axes_dim, float(ntk_factor)

    def forward(self, ids: torch.Tensor):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed  # here: the registry imports no diffusers model

        pos = ids.float()
        freqs_dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
        cos_out, sin_out = [], []
        for i in range(ids.shape[-1]):
            cos, sin = get_1d_rotary_pos_embed(self.axes_dim[i], pos[:, i], theta=self.theta, use_real=True,
                                               repeat_interleave_real=True, freqs_dtype=freqs_dtype,
                                               ntk_factor=self.ntk_factor)
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, axes_dim={list(self.axes_dim)}, ntk_factor={self.ntk_factor:g}"


def set_ntk_rope(model: torch.nn.Module, ntk_factor: float) -> None:
    """Make ``model.pos_embed`` (FLUX transformer or ControlNet) NTK-scaled by ``ntk_factor``;
    ``1`` restores a plain ``FluxPosEmbed``. Nothing else of the model changes."""
    # here: the registry imports no diffusers model
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    pe = model.pos_embed
    if not isinstance(pe, (FluxPosEmbed, NTKFluxPosEmbed)):
        raise TypeError(f"{type(model).__name__}.pos_embed is a {type(pe).__name__}, not FLUX's FluxPosEmbed: "
                        "NTK scaling applies to RoPE only (SD3's positions are a fixed table, not RoPE)")
    if float(ntk_factor) == 1.0:
        model.pos_embed = FluxPosEmbed(pe.theta, pe.axes_dim)
    else:
        model.pos_embed = NTKFluxPosEmbed(pe.theta, pe.axes_dim, ntk_factor)


@contextlib.contextmanager
def ntk_rope(models, ntk_factor: float | None):
    """Within the block, the given model(s) use NTK-scaled RoPE; the original ``pos_embed``
    objects are put back afterwards. ``ntk_factor`` 1 or ``None``: nothing changes (any model)."""
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    saved = [(m, m.pos_embed) for m in models]
    try:
        if ntk_factor is not None and float(ntk_factor) != 1.0:
            for m in models:
                set_ntk_rope(m, ntk_factor)
        yield
    finally:
        for m, pe in saved:
            m.pos_embed = pe


# ------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------

class FluxFamily(ModelFamily):
    """FLUX.1: CLIP pooled + T5 text, 2x2-packed latents with RoPE ids, timestep in [0, 1],
    guidance as an embedding (dev)."""

    def ntk_rope(self, models, ntk_factor):
        return ntk_rope(models, ntk_factor)

    def grid(self, bound: inspect.BoundArguments) -> tuple[int, int]:
        img_ids = bound.arguments.get("img_ids")
        if img_ids is None:
            raise ValueError("CLEAR needs img_ids in the FLUX forward to know the image grid")
        return grid_from_ids(img_ids)

    def text_lens(self, bound):
        return (bound.arguments["encoder_hidden_states"].shape[1],)

    def attention_kwargs(self, model):
        # diffusers' FluxControlNetModel takes joint_attention_kwargs but hands them to no block
        return None if _is_controlnet(model) else "joint_attention_kwargs"

    def grid_rules(self, vae_factor, transformer_config):
        return vae_factor * 2, None  # FluxPipeline packs 2x2 latents into one token; RoPE has no table

    def training_guidance(self, transformer_config, guidance_scale):
        return guidance_scale if transformer_config.get("guidance_embeds") else None

    def encode_prompt(self, pipe, prompts, device, max_sequence_length, negative=False):
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                      max_sequence_length=max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def transformer_inputs(self, latents, timesteps, prompt_embeds, pooled_prompt_embeds, guidance,
                           num_train_timesteps=1000):
        from diffusers import FluxPipeline  # here: the registry imports no diffusers model

        b, c, h, w = latents.shape
        dtype = prompt_embeds.dtype
        return dict(
            hidden_states=FluxPipeline._pack_latents(latents.to(dtype), b, c, h, w),
            timestep=(timesteps / num_train_timesteps).to(dtype),
            guidance=None if guidance is None else torch.full((b,), float(guidance), device=latents.device,
                                                              dtype=dtype),
            pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype),
            return_dict=False,
        )

    def output_layout(self, latents):
        from diffusers import FluxPipeline  # here: the registry imports no diffusers model

        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)


def _is_controlnet(model) -> bool:
    return any(c.__name__ == "FluxControlNetModel" for c in type(model).__mro__)


def _is_mini(config) -> bool:
    # the mini teacher's transformer (clear.mini.teacher.TRANSFORMER_CONFIG)
    return (config.get("num_layers"), config.get("num_single_layers"), config.get("joint_attention_dim")) == (2, 4, 64)


# The released models, most specific first (the first that recognises a config is the one).
# L0 = image tokens at the training size + T5 tokens: FLUX.1 64x64 at 1024^2 (16 pixels per token) + 512,
# for schnell too (sampled with 256 T5 tokens, but CLEAR has always scaled it by FLUX.1's L0); the mini
# model 16x16 at 64^2 (4 pixels per token) + 32. (clear.ClearAttention made by hand defaults to FLUX.1's L0;
# tests/test_families.py holds the two equal.)
FLUX1_TRAINING_TOKENS = 64 * 64 + 512
SPECS = (
    ModelSpec("CLEAR-mini", _is_mini, steps=28, guidance=3.5, max_sequence_length=32, training_tokens=16 * 16 + 32),
    ModelSpec("FLUX.1-dev", lambda c: bool(c.get("guidance_embeds")), steps=28, guidance=3.5,
              max_sequence_length=512, training_tokens=FLUX1_TRAINING_TOKENS, width=24 * 128, layers=19 + 38),
    ModelSpec("FLUX.1-schnell", lambda c: True, steps=4, guidance=0.0, max_sequence_length=256,
              training_tokens=FLUX1_TRAINING_TOKENS, width=24 * 128, layers=19 + 38),
)

FAMILY = FluxFamily(
    name="flux", pipeline_class="FluxPipeline", transformer_class="FluxTransformer2DModel",
    model_classes=("FluxTransformer2DModel", "FluxControlNetModel"), processor=FluxClearAttnProcessor,
    text_first=True, specs=SPECS,
    streams=(("double", "transformer_blocks"), ("joint", "transformer_blocks"),
             ("single", "single_transformer_blocks")),
    repeated_blocks=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
    text_components=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), t5_tokenizer="tokenizer_2",
    attn_loss_layers="single:4:1",  # the public release's L_attn layers: FLUX.1-dev single blocks 1, 5, ..., 37
    pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetPipeline",
               "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"),
    img2img_class="FluxImg2ImgPipeline", rope=True, released_weights=True, example="black-forest-labs/FLUX.1-dev",
)
