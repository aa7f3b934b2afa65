"""Qwen-Image (QwenImageTransformer2DModel): Qwen-Image and Qwen-Image-Edit.

Everything CLEAR knows about the family: its attention processor (60 double-stream blocks, joint
attention over ``[text | image]``, diffusers' ``QwenDoubleStreamAttnProcessor2_0``), how a forward gives
the image grid (``img_shapes``: the first shape is the output image, later ones are the edit pipelines'
input pictures, whose tokens follow the image), the text padding (``encoder_hidden_states_mask``), the
released models (:data:`SPECS`), block streams and checkpoint block names, encoders and transformer
inputs (Qwen2.5-VL text ``[B, L, 3584]`` with its mask, 2x2-packed latents, timestep in [0, 1], no
guidance embedding), size rules (the VAE's factor x 2 pixels per token, RoPE without a table) and the
pipelines.

Padded text and reference pictures: diffusers' processor hides padded text keys from every query with
a mask and refuses any other mask. CLEAR makes the two one layout (:class:`clear.processors.Arrangement`):
padded text tokens are dropped from the keys of every query, valid text and the input pictures' tokens
are global (seen by all, seeing all), the output image attends through the window; a padded text token
still queries, as a text token does. Text-to-image without padding is the layout as it is.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from ..processors import Arrangement, ClearProcessorBase, attend_arranged
from .base import ModelFamily, ModelSpec


class QwenClearAttnProcessor(ClearProcessorBase):
    """CLEAR for Qwen-Image's joint attention: diffusers' ``QwenDoubleStreamAttnProcessor2_0`` with the
    window; the text mask of the forward reaches it through the model's arrangement."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, clear_forward=None):
        # here: the registry imports no diffusers model
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("CLEAR defines its own attention pattern; an explicit attention_mask is not supported "
                             "(pass the text padding as the model's encoder_hidden_states_mask)")
        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        txt_q, txt_k, txt_v = (heads(attn.add_q_proj(encoder_hidden_states)),
                               heads(attn.add_k_proj(encoder_hidden_states)),
                               heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)

        query, key, value = torch.cat([txt_q, img_q], 1), torch.cat([txt_k, img_k], 1), torch.cat([txt_v, img_v], 1)
        out = attend_arranged(self, query, key, value, clear_forward).flatten(2, 3).to(query.dtype)

        seq_txt = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())


def image_shapes(bound: inspect.BoundArguments) -> tuple[tuple[int, int], int]:
    """``((height, width), reference tokens)`` of a forward from its ``img_shapes`` (read as diffusers'
    ``QwenEmbedRope`` reads them: the first batch entry's list of ``(frames, height, width)``; the first
    is the output image, the others the edit pipelines' input pictures)."""
    shapes = bound.arguments.get("img_shapes")
    if shapes is None:
        raise ValueError("CLEAR needs img_shapes in the Qwen-Image forward to know the image grid")
    if getattr(bound.arguments["self"].config, "use_layer3d_rope", False):
        raise NotImplementedError("CLEAR does not support Qwen-Image-Layered (use_layer3d_rope): its layers are "
                                  "several images of one grid, which one window cannot describe")
    if isinstance(shapes, list):
        shapes = shapes[0]
    if not isinstance(shapes, list):
        shapes = [shapes]
    frames, height, width = (int(v) for v in shapes[0])
    if frames != 1:
        raise NotImplementedError(f"CLEAR takes one image frame, got img_shapes {shapes[0]}")
    refs = sum(math.prod(int(v) for v in s) for s in shapes[1:])
    tokens = bound.arguments["hidden_states"].shape[1]
    if tokens != height * width + refs:
        raise ValueError(f"hidden_states has {tokens} tokens but img_shapes {shapes} describe {height * width + refs}")
    return (height, width), refs


def _padded(pipe, prompts, device, length):
    """``(embeds [B, length, D], mask [B, length])`` of ``pipe.encode_prompt``, zero-padded (mask 0) to ``length``."""
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=length)
    if mask is None:  # the pipeline drops a mask that is all ones
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    pad = length - embeds.shape[1]
    return torch.nn.functional.pad(embeds, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))


class QwenImageFamily(ModelFamily):
    """Qwen-Image: Qwen2.5-VL text with a padding mask, 2x2-packed latents, timestep in [0, 1], true
    classifier-free guidance (a second forward), no guidance embedding."""

    def grid(self, bound: inspect.BoundArguments) -> tuple[int, int]:
        return image_shapes(bound)[0]

    def text_lens(self, bound):
        return (bound.arguments["encoder_hidden_states"].shape[1],)

    def attention_kwargs(self, model):
        return "attention_kwargs"  # QwenImageTransformer2DModel hands them to its blocks as joint_attention_kwargs

    def arrangement(self, bound, grid):
        _, refs = image_shapes(bound)
        return Arrangement.build(bound.arguments["encoder_hidden_states"].shape[1], grid[0] * grid[1], refs,
                                 bound.arguments.get("encoder_hidden_states_mask"),
                                 device=bound.arguments["hidden_states"].device)

    def size_rules(self, pretrained_model_name_or_path):
        from diffusers import AutoencoderKLQwenImage  # here: the registry imports no diffusers model

        vae = AutoencoderKLQwenImage.load_config(pretrained_model_name_or_path, subfolder="vae")
        vae_factor = 2 ** len(vae.get("temperal_downsample", (False, True, True)))  # as QwenImagePipeline
        return self.grid_rules(vae_factor, self.transformer_config(pretrained_model_name_or_path))

    def grid_rules(self, vae_factor, transformer_config):
        return vae_factor * int(transformer_config.get("patch_size", 2)), None  # 2x2 packing; RoPE has no table

    def training_guidance(self, transformer_config, guidance_scale):
        return None

    def ntk_rope(self, models, ntk_factor):
        self.resolve_ntk_factor(ntk_factor)  # refuses a factor other than 1
        return contextlib.nullcontext()

    def resolve_ntk_factor(self, ntk_factor):
        """Qwen-Image's RoPE is a table of centred positions (QwenEmbedRope), which NTK scaling is not written
        for: no factor by default, an explicit one other than 1 is an error."""
        if ntk_factor is not None and float(ntk_factor) != 1.0:
            raise ValueError(f"ntk_factor={float(ntk_factor):g}: NTK-scaled RoPE is not implemented for Qwen-Image's "
                             "centred RoPE table; leave --ntk_factor out (or pass 1)")
        return None

    def guidance_kwargs(self, guidance, given=None):
        """True classifier-free guidance (``true_cfg_scale``, a second forward on the empty prompt " ", the
        pipelines' recommendation), unless the call brings its own negative prompt."""
        given = given or {}
        out = {"true_cfg_scale": guidance}
        if guidance > 1 and given.get("negative_prompt") is None and given.get("negative_prompt_embeds") is None:
            out["negative_prompt"] = " "
        return out

    def encode_prompt(self, pipe, prompts, device, max_sequence_length, negative=False):
        """QwenImagePipeline.encode_prompt's embeddings and text mask, padded to ``max_sequence_length`` tokens
        (the pipeline pads to the longest prompt of a call; padded tokens are masked, so they change nothing)."""
        out = dict(zip(("prompt_embeds", "prompt_embeds_mask"),
                       _padded(pipe, list(prompts), device, max_sequence_length)))
        if negative:
            out.update(zip(("negative_prompt_embeds", "negative_prompt_embeds_mask"),
                           _padded(pipe, [" "] * len(prompts), device, max_sequence_length)))
        return out

    def encode_image(self, pipe, images):
        """The VAE posterior of images ``[B, 3, H, W]`` normalised as QwenImageImg2ImgPipeline's
        ``_encode_vae_image`` normalises its sample (``(z - latents_mean) / latents_std`` per channel; the one
        frame dropped): ``mean + std * eps`` is that pipeline's latent for noise ``eps``. ``[B, 16, H/8, W/8]``."""
        dist = pipe.vae.encode(images.unsqueeze(2)).latent_dist
        cfg = pipe.vae.config
        shift = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(dist.mean)
        scale = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(dist.mean)
        return {"latent_mean": ((dist.mean - shift) / scale).squeeze(2), "latent_std": (dist.std / scale).squeeze(2)}

    def latent_scaling(self, pretrained_model_name_or_path):
        return 0.0, 1.0  # encode_image's moments are already normalised

    def transformer_inputs(self, latents, timesteps, prompt_embeds, pooled_prompt_embeds, guidance,
                           num_train_timesteps=1000):
        """``latents``: the VAE's ``[B, 16, H/8, W/8]``; ``pooled_prompt_embeds``: Qwen-Image has no pooled text,
        this is the text mask ``[B, L]`` (``prompt_embeds_mask``; ``None``: every token valid)."""
        from diffusers import QwenImagePipeline  # here: the registry imports no diffusers model

        b, c, h, w = latents.shape
        dtype = prompt_embeds.dtype
        return dict(
            hidden_states=QwenImagePipeline._pack_latents(latents.to(dtype), b, c, h, w),
            timestep=(timesteps / num_train_timesteps).to(dtype),
            encoder_hidden_states=prompt_embeds,
            encoder_hidden_states_mask=pooled_prompt_embeds,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )

    def output_layout(self, latents):
        from diffusers import QwenImagePipeline  # here: the registry imports no diffusers model

        b, c, h, w = latents.shape
        return QwenImagePipeline._pack_latents(latents, b, c, h, w)


# The released models, most specific first; sampling settings: the pipelines' defaults (50 steps, true CFG 4,
# 512 text tokens at most). L0 = 83x83 image tokens at 1328^2 (the model card's 1:1 size, 16 pixels per token)
# + 512 text tokens.
QWEN_TRAINING_TOKENS = 83 * 83 + 512
SPECS = (
    ModelSpec("Qwen-Image-Edit-2511", lambda c: bool(c.get("zero_cond_t")), steps=40, guidance=4.0,
              max_sequence_length=512, training_tokens=QWEN_TRAINING_TOKENS, width=24 * 128, layers=60),
    ModelSpec("Qwen-Image", lambda c: True, steps=50, guidance=4.0, max_sequence_length=512,
              training_tokens=QWEN_TRAINING_TOKENS, width=24 * 128, layers=60),
)

FAMILY = QwenImageFamily(
    name="qwenimage", pipeline_class="QwenImagePipeline", transformer_class="QwenImageTransformer2DModel",
    model_classes=("QwenImageTransformer2DModel",), processor=QwenClearAttnProcessor, text_first=True,
    specs=SPECS, streams=(("double", "transformer_blocks"), ("joint", "transformer_blocks")),
    repeated_blocks=("QwenImageTransformerBlock",), text_components=("text_encoder", "tokenizer"),
    t5_tokenizer="tokenizer", attn_loss_layers="double:4:1",  # blocks 1, 5, ..., 57 of 60
    pipelines=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
               "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"),
    img2img_class="QwenImageImg2ImgPipeline", vae_class="AutoencoderKLQwenImage",
    prompt_features=("prompt_embeds", "prompt_embeds_mask"), rope=False, released_weights=False,
    example="Qwen/Qwen-Image", max_text_tokens=1024,
)
