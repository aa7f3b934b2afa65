"""FLUX.2 (dev, klein; Flux2Transformer2DModel).

Everything CLEAR knows about the family: its attention processor (8 double-stream blocks with a
separate text stream, ``Flux2Attention``; 48 single-stream blocks over ``[text | image]`` whose q, k, v
come out of one projection fused with the MLP input, ``Flux2ParallelSelfAttention``), how a forward
gives the image grid (``img_ids`` with 4 axes (t, h, w, l): the output image at t = 0, reference images
for editing after it at t = 10, 20, ...), the released models (:data:`SPECS`), block streams and
checkpoint block names, encoders and transformer inputs (Mistral text ``[B, 512, 15360]`` with 4-axis
text ids, 2x2-patchified latents ``[B, 128, H/16, W/16]`` packed row-major, timestep in [0, 1],
guidance as an embedding on dev), size rules (16 pixels per token, RoPE without a table) and the
pipelines.

Reference images (Flux2Pipeline's ``image=``): their tokens are global, like text (see
:class:`clear.processors.Arrangement`): every query sees all of them and they see every token; the
output image's tokens see each other through the window. Text-to-image is the layout as it is.

diffusers' FLUX.2 modules are imported where they are used, so that importing the registry does not
import every diffusers transformer.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ..geometry import grid_from_ids
from ..processors import Arrangement, ClearProcessorBase, attend_arranged
from .base import ModelFamily, ModelSpec
from .flux import NTKFluxPosEmbed, joint_heads


class Flux2ClearAttnProcessor(ClearProcessorBase):
    """CLEAR for FLUX.2's two attention modules: ``Flux2Attention`` (double-stream blocks, diffusers'
    ``Flux2AttnProcessor``) and ``Flux2ParallelSelfAttention`` (single-stream blocks,
    ``Flux2ParallelSelfAttnProcessor``); the same maths as diffusers' apart from the window."""

    def __call__(self, attn, hidden_states, *args, clear_forward=None, **kwargs):
        if hasattr(attn, "to_qkv_mlp_proj"):
            return self._single(attn, hidden_states, *args, clear_forward=clear_forward, **kwargs)
        return self._double(attn, hidden_states, *args, clear_forward=clear_forward, **kwargs)

    def _double(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                clear_forward=None):
        # here: the registry imports no diffusers model
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("CLEAR defines its own attention pattern; an explicit attention_mask is not supported")
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = joint_heads(attn, (query, key, value), (enc_q, enc_k, enc_v), image_rotary_emb)

        out = attend_arranged(self, query, key, value, clear_forward).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            enc_out, out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                                 out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            enc_out = attn.to_add_out(enc_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, enc_out)

    def _single(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, clear_forward=None):
        from diffusers.models.embeddings import apply_rotary_emb  # here: the registry imports no diffusers model

        if attention_mask is not None:
            raise ValueError("CLEAR defines its own attention pattern; an explicit attention_mask is not supported")
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = attend_arranged(self, query, key, value, clear_forward).flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp_hidden_states)], dim=-1))


def _image_ids(bound: inspect.BoundArguments) -> torch.Tensor:
    img_ids = bound.arguments.get("img_ids")
    if img_ids is None:
        raise ValueError("CLEAR needs img_ids in the FLUX.2 forward to know the image grid")
    if bound.arguments.get("kv_cache_mode") is not None:
        raise NotImplementedError("CLEAR does not support FLUX.2's reference KV cache (kv_cache_mode): its cached "
                                  "reference keys bypass the attention layout; call the transformer without it")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[-1] != 4:
        raise ValueError(f"FLUX.2 img_ids must have shape [tokens, 4] (t, h, w, l), got {tuple(img_ids.shape)}")
    return ids


def image_grid(img_ids: torch.Tensor) -> tuple[tuple[int, int], int]:
    """``((height, width), reference tokens)`` of FLUX.2 ``img_ids`` ``[tokens, 4]`` (t, h, w, l): the output
    image is the leading run of tokens at the first token's t (a row-major rectangle), every later token
    belongs to a reference image (t = 10, 20, ... in Flux2Pipeline)."""
    t = img_ids[:, 0]
    later = (t != t[0]).nonzero()
    n = int(later[0, 0]) if later.numel() else img_ids.shape[0]
    return grid_from_ids(img_ids[:n]), img_ids.shape[0] - n


@contextlib.contextmanager
def ntk_rope(models, ntk_factor: float | None):
    """Within the block, the given FLUX.2 transformer(s) use NTK-scaled RoPE (FLUX.1's
    :class:`clear.families.flux.NTKFluxPosEmbed` over FLUX.2's four axes and theta); the original
    ``pos_embed`` objects are put back afterwards. ``ntk_factor`` 1 or ``None``: nothing changes."""
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    saved = [(m, m.pos_embed) for m in models]
    try:
        if ntk_factor is not None and float(ntk_factor) != 1.0:
            for m, pe in saved:
                m.pos_embed = NTKFluxPosEmbed(pe.theta, pe.axes_dim, ntk_factor)
        yield
    finally:
        for m, pe in saved:
            m.pos_embed = pe


class Flux2Family(ModelFamily):
    """FLUX.2: Mistral (dev) or Qwen3 (klein) text, patchified latents with 4-axis RoPE ids, timestep in
    [0, 1], guidance as an embedding (dev)."""

    def ntk_rope(self, models, ntk_factor):
        return ntk_rope(models, ntk_factor)

    def grid(self, bound: inspect.BoundArguments) -> tuple[int, int]:
        return image_grid(_image_ids(bound))[0]

    def text_lens(self, bound):
        return (bound.arguments["encoder_hidden_states"].shape[1],)

    def arrangement(self, bound, grid):
        ids = _image_ids(bound)
        _, refs = image_grid(ids)
        return Arrangement.build(bound.arguments["encoder_hidden_states"].shape[1], grid[0] * grid[1], refs,
                                 device=bound.arguments["hidden_states"].device)

    def grid_rules(self, vae_factor, transformer_config):
        return vae_factor * 2, None  # Flux2Pipeline patchifies 2x2 latents into one token; RoPE has no table

    def training_guidance(self, transformer_config, guidance_scale):
        return guidance_scale if transformer_config.get("guidance_embeds") else None

    def encode_prompt(self, pipe, prompts, device, max_sequence_length, negative=False):
        prompt_embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=device,
                                              max_sequence_length=max_sequence_length)
        return {"prompt_embeds": prompt_embeds}

    def folder_pipeline_cls(self, pretrained_model_name_or_path):
        """``Flux2KleinPipeline`` for a klein folder (its Qwen3 text encoder and chat template), else
        ``Flux2Pipeline`` (Mistral); both encode prompts with the same ``encode_prompt`` signature."""
        import diffusers

        try:
            name = diffusers.DiffusionPipeline.load_config(pretrained_model_name_or_path).get("_class_name")
        except (OSError, ValueError):
            name = None
        return diffusers.Flux2KleinPipeline if name == "Flux2KleinPipeline" else self.pipeline_cls()

    def encode_image(self, pipe, images):
        """Flux2Pipeline's own image latents (``_encode_vae_image``: the posterior mode, 2x2-patchified,
        normalised by the VAE's batch-norm statistics) ``[B, 128, H/16, W/16]``, with std 0: FLUX.2 trains on the
        mode, as the pipeline encodes images and diffusers' FLUX.2 training scripts do."""
        mean = pipe._encode_vae_image(images, generator=None)
        return {"latent_mean": mean, "latent_std": torch.zeros_like(mean)}

    def latent_scaling(self, pretrained_model_name_or_path):
        return 0.0, 1.0  # encode_image's latents are already the transformer's

    def transformer_inputs(self, latents, timesteps, prompt_embeds, pooled_prompt_embeds, guidance,
                           num_train_timesteps=1000):
        """``latents``: Flux2Pipeline's patchified latents ``[B, 128, H/16, W/16]``; ``pooled_prompt_embeds``
        is not used (FLUX.2 has no pooled text)."""
        from diffusers import Flux2Pipeline  # here: the registry imports no diffusers model

        b = latents.shape[0]
        dtype = prompt_embeds.dtype
        return dict(
            hidden_states=Flux2Pipeline._pack_latents(latents.to(dtype)),
            timestep=(timesteps / num_train_timesteps).to(dtype),
            guidance=None if guidance is None else torch.full((b,), float(guidance), device=latents.device,
                                                              dtype=dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=Flux2Pipeline._prepare_text_ids(prompt_embeds).to(latents.device),
            img_ids=Flux2Pipeline._prepare_latent_ids(latents).to(latents.device),
            return_dict=False,
        )

    def output_layout(self, latents):
        from diffusers import Flux2Pipeline  # here: the registry imports no diffusers model

        return Flux2Pipeline._pack_latents(latents)


# The released models, most specific first. L0 = 64x64 image tokens at 1024^2 (16 pixels per token) + 512
# text tokens, as FLUX.1's. FLOPs sizes: FLUX.2-dev is Flux2Transformer2DModel's default config (8 + 48 blocks,
# 48 heads x 128); klein's sizes differ by checkpoint and are not recorded. Sampling settings: Flux2Pipeline's /
# Flux2KleinPipeline's defaults (the model cards'; the step-distilled klein checkpoints take steps=4, guidance=1).
FLUX2_TRAINING_TOKENS = 64 * 64 + 512
SPECS = (
    ModelSpec("FLUX.2-dev", lambda c: bool(c.get("guidance_embeds")), steps=50, guidance=4.0,
              max_sequence_length=512, training_tokens=FLUX2_TRAINING_TOKENS, width=48 * 128, layers=8 + 48),
    ModelSpec("FLUX.2-klein", lambda c: True, steps=50, guidance=4.0, max_sequence_length=512,
              training_tokens=FLUX2_TRAINING_TOKENS),
)

FAMILY = Flux2Family(
    name="flux2", pipeline_class="Flux2Pipeline", transformer_class="Flux2Transformer2DModel",
    model_classes=("Flux2Transformer2DModel",), processor=Flux2ClearAttnProcessor, text_first=True, specs=SPECS,
    streams=(("double", "transformer_blocks"), ("joint", "transformer_blocks"),
             ("single", "single_transformer_blocks")),
    repeated_blocks=("Flux2TransformerBlock", "Flux2SingleTransformerBlock"),
    text_components=("text_encoder", "tokenizer"), t5_tokenizer="tokenizer",
    attn_loss_layers="single:4:1",  # as FLUX.1's: every 4th single-stream block from the second
    pipelines=("Flux2Pipeline", "Flux2KleinPipeline"),
    img2img_class="", vae_class="AutoencoderKLFlux2", prompt_features=("prompt_embeds",), rope=True,
    max_text_tokens=None, released_weights=False, example="black-forest-labs/FLUX.2-dev",
)
