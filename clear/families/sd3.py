"""SD3 / SD3.5 (SD3Transformer2DModel): SD3-Medium, SD3.5-Medium, SD3.5-Large.

Everything CLEAR knows about the family: its attention processor (joint attention over
``[image | text]`` without RoPE, and SD3.5's image-only ``attn2`` of dual-attention blocks), how a
forward gives the image grid (the latent shape over the patch size), the released models
(:data:`SPECS`), block streams and checkpoint block names, encoders and transformer inputs
(CLIP-L + CLIP-G (pooled, 2048) + T5 text ``[B, 77 + T, 4096]``, unpacked ``[B, C, H, W]`` latents,
timestep ``sigma * 1000``, no guidance embedding), size rules (a fixed table of
``pos_embed_max_size`` positions a side) and the pipelines.
"""

from __future__ import annotations

import inspect

import torch

from ..processors import ClearProcessorBase
from .base import ModelFamily, ModelSpec


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

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, clear_forward=None):
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

        layout, plan = self._layout_and_plan(clear_forward, attention_mask, q.shape[1])
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


class SD3Family(ModelFamily):
    """SD3 / SD3.5: classifier-free guidance is for sampling only, training uses none."""

    def grid(self, bound: inspect.BoundArguments) -> tuple[int, int]:
        model, latents = bound.arguments["self"], bound.arguments["hidden_states"]
        p = model.config.patch_size
        height, width = latents.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"the latent size {height}x{width} is not divisible by the patch size {p}")
        return height // p, width // p

    def text_lens(self, bound):
        joint = bound.arguments["encoder_hidden_states"].shape[1]
        dual = getattr(bound.arguments["self"].config, "dual_attention_layers", None)
        return (joint, 0) if dual else (joint,)  # SD3.5's attn2 of dual-attention blocks is image-only

    def grid_rules(self, vae_factor, transformer_config):
        # SD3's fixed table of positions: pos_embed_max_size tokens a side
        size = transformer_config.get("pos_embed_max_size")
        return vae_factor * int(transformer_config.get("patch_size", 2)), (int(size) if size else None)

    def training_guidance(self, transformer_config, guidance_scale):
        return None

    def encode_prompt(self, pipe, prompts, device, max_sequence_length, negative=False):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=negative,
            max_sequence_length=max_sequence_length)
        out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if negative:
            out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return out

    def transformer_inputs(self, latents, timesteps, prompt_embeds, pooled_prompt_embeds, guidance,
                           num_train_timesteps=1000):
        # diffusers' SD3 training script: the scheduler's timesteps as they are (in [0, num_train_timesteps])
        return dict(hidden_states=latents.to(prompt_embeds.dtype), timestep=timesteps,
                    encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds, return_dict=False)

    def output_layout(self, latents):
        return latents


# The released models, most specific first: SD3.5-Medium has dual-attention layers, SD3.5-Large QK
# norm; SD3-Medium neither. SD3.5-Large-Turbo has SD3.5-Large's config: pass steps=4, guidance=0 for it.
# L0 = 64x64 image tokens at 1024^2 + CLIP 77 + T5 256.
_L0 = 64 * 64 + 77 + 256
SPECS = (
    ModelSpec("SD3.5-Medium", lambda c: bool(c.get("dual_attention_layers")), steps=40, guidance=4.5,
              max_sequence_length=256, training_tokens=_L0),
    ModelSpec("SD3.5-Large", lambda c: bool(c.get("qk_norm")), steps=28, guidance=3.5, max_sequence_length=256,
              training_tokens=_L0),
    ModelSpec("SD3-Medium", lambda c: True, steps=28, guidance=7.0, max_sequence_length=256, training_tokens=_L0),
)

FAMILY = SD3Family(
    name="sd3", pipeline_class="StableDiffusion3Pipeline", transformer_class="SD3Transformer2DModel",
    model_classes=("SD3Transformer2DModel",), processor=SD3ClearAttnProcessor, text_first=False, specs=SPECS,
    streams=(("joint", "transformer_blocks"), ("double", "transformer_blocks")),  # all blocks are joint
    repeated_blocks=("JointTransformerBlock",),
    text_components=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
    t5_tokenizer="tokenizer_3", attn_loss_layers="joint:4",
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    img2img_class="StableDiffusion3Img2ImgPipeline", rope=False, released_weights=False,
    example="stabilityai/stable-diffusion-3.5-large",
)
