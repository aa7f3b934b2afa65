"""Turn prompts and images into what a diffusion transformer consumes, with the pipeline's own encoders.

* :class:`ModelFamily` (``FAMILIES["flux"]``, ``FAMILIES["sd3"]``): everything training and
  data generation need to know about one model family, in one place: its pipeline and
  transformer classes, how a prompt is encoded, how noisy latents, timesteps and text are
  handed to the transformer, in which layout it predicts, and its defaults.
  :func:`resolve_family` reads the family from a model's ``model_index.json`` / transformer config.
* :class:`PromptEncoder`: the pipeline's text encoders (FLUX: CLIP pooled + T5 tokens; SD3:
  CLIP-L + CLIP-G + T5), as its own ``encode_prompt``.
* :class:`LatentEncoder`: the VAE posterior of an image (mean and std), which the cache
  stores so that training can still sample ``z = mean + std * eps`` afresh every step.
* :func:`latents_from_moments`: that sample, shifted and scaled as the transformer expects.

Used by the data and cache scripts, by ``scripts/distill.py`` when it reads raw prompts and
images, and to encode the validation prompts once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .models import model_defaults


# ------------------------------------------------------------------------------------------
# model families
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFamily:
    """What differs between model families for training; one instance per family in :data:`FAMILIES`.

    Latents are always ``[B, C, H, W]`` (VAE layout) outside :meth:`transformer_inputs`;
    :meth:`output_layout` puts a latent-shaped target into the layout the transformer predicts in."""

    name: str  # clear.model_family's name
    pipeline_class: str
    transformer_class: str
    text_components: tuple[str, ...]  # pipeline components that encode prompts
    t5_tokenizer: str  # the component that limits max_sequence_length
    max_sequence_length: int  # default T5 tokens
    attn_loss_layers: str  # default layers of L_attn (see clear.distill.attention_layers)
    # inference (clear.inference): pipelines recognised in model_index.json, the SDEdit pipeline,
    # whether positions are RoPE (NTK scaling applies), whether CLEAR weights are released
    pipelines: tuple[str, ...] = ()
    img2img_class: str = ""
    rope: bool = False
    released_weights: bool = False
    example: str = ""

    # -- loading -----------------------------------------------------------------------
    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def transformer_cls(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def transformer_config(self, pretrained_model_name_or_path: str) -> dict:
        return self.transformer_cls().load_config(pretrained_model_name_or_path, subfolder="transformer")

    def size_rules(self, pretrained_model_name_or_path: str) -> tuple[int, int | None]:
        """``(pixels per token, most tokens per side or None)``, from the configs only."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return self.grid_rules(vae_factor, self.transformer_config(pretrained_model_name_or_path))

    def grid_rules(self, vae_factor: int, transformer_config) -> tuple[int, int | None]:
        """``(pixels per token, most tokens per side or None)`` from the VAE factor and the
        transformer config (a dict or a loaded model's config)."""
        raise NotImplementedError

    def check_size(self, pretrained_model_name_or_path: str, pixels: int, down_factor: int = 1,
                   name: str = "--resolution") -> None:
        """Fail, saying what to use, unless ``pixels`` makes a token grid this model takes (with ``down_factor``)."""
        per_token, max_grid = self.size_rules(pretrained_model_name_or_path)
        if pixels % per_token or (pixels // per_token) % down_factor:
            raise ValueError(f"{name} {pixels} must be a multiple of {per_token * down_factor} ({per_token} pixels "
                             f"per token x down_factor {down_factor})")
        if max_grid is not None and pixels // per_token > max_grid:
            raise ValueError(f"{name} {pixels} is {pixels // per_token} tokens per side; this {self.name} model has "
                             f"positions for at most {max_grid} ({max_grid * per_token} pixels)")

    def pipeline(self, transformer, vae, scheduler):
        """The text-to-image pipeline around these components, without text encoders (prompts go in as embeddings)."""
        return self.pipeline_cls()(transformer=transformer, vae=vae, scheduler=scheduler,
                                   **{c: None for c in self.text_components})

    # -- family-specific -----------------------------------------------------------------

    def default_guidance_scale(self, transformer_config) -> float:
        """Guidance for generating data and validation images with this model."""
        raise NotImplementedError

    def training_guidance(self, transformer_config, guidance_scale: float) -> float | None:
        """The guidance the transformer takes in training (an embedded guidance value, or None)."""
        raise NotImplementedError

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int,
                      negative: bool = False) -> dict[str, torch.Tensor]:
        """``{"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P]}`` as the pipeline's
        ``encode_prompt`` gives them; ``negative``: also the empty prompt's, for classifier-free
        guidance (``negative_*``), where the family uses it. Keys are pipeline call arguments."""
        raise NotImplementedError

    def transformer_inputs(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                           pooled_prompt_embeds: torch.Tensor, guidance: float | None,
                           num_train_timesteps: int = 1000) -> dict:
        """Keyword arguments of the transformer's forward for noisy latents ``[B, C, H, W]`` at the
        scheduler's ``timesteps`` (``sigma * num_train_timesteps``)."""
        raise NotImplementedError

    def output_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> the layout of the transformer's prediction."""
        raise NotImplementedError


class FluxFamily(ModelFamily):
    """FLUX.1 (dev, schnell): CLIP pooled + T5 text, 2x2-packed latents with RoPE ids,
    timestep in [0, 1], guidance as an embedding (dev)."""

    def grid_rules(self, vae_factor, transformer_config):
        return vae_factor * 2, None  # FluxPipeline packs 2x2 latents into one token; RoPE has no table

    def default_guidance_scale(self, transformer_config):
        return model_defaults("flux", transformer_config).guidance

    def training_guidance(self, transformer_config, guidance_scale):
        return guidance_scale if transformer_config.get("guidance_embeds") else None

    def encode_prompt(self, pipe, prompts, device, max_sequence_length, negative=False):
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                      max_sequence_length=max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def transformer_inputs(self, latents, timesteps, prompt_embeds, pooled_prompt_embeds, guidance,
                           num_train_timesteps=1000):
        from diffusers import FluxPipeline

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
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)


class SD3Family(ModelFamily):
    """SD3 / SD3.5: CLIP-L + CLIP-G (pooled, 2048) + T5 text (``[B, 77 + T, 4096]``), unpacked
    ``[B, C, H, W]`` latents, timestep ``sigma * 1000`` (as SD3's scheduler gives), no guidance
    embedding: classifier-free guidance is for sampling only, training uses none."""

    def grid_rules(self, vae_factor, transformer_config):
        # SD3's fixed table of positions: pos_embed_max_size tokens a side
        size = transformer_config.get("pos_embed_max_size")
        return vae_factor * int(transformer_config.get("patch_size", 2)), (int(size) if size else None)

    def default_guidance_scale(self, transformer_config):
        return model_defaults("sd3", transformer_config).guidance

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


FAMILIES: dict[str, ModelFamily] = {
    "flux": FluxFamily("flux", "FluxPipeline", "FluxTransformer2DModel",
                       ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), "tokenizer_2", 512,
                       "single:4:1",  # the public release's L_attn layers: FLUX.1-dev single blocks 1, 5, ..., 37
                       pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetPipeline",
                                  "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"),
                       img2img_class="FluxImg2ImgPipeline", rope=True, released_weights=True,
                       example="black-forest-labs/FLUX.1-dev"),
    "sd3": SD3Family("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                     ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
                     "tokenizer_3", 256, "joint:4",
                     pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                                "StableDiffusion3InpaintPipeline"),
                     img2img_class="StableDiffusion3Img2ImgPipeline", rope=False, released_weights=False,
                     example="stabilityai/stable-diffusion-3.5-large"),
}


def detect_family(pretrained_model_name_or_path: str | os.PathLike) -> ModelFamily | None:
    """The family of a pipeline folder / Hub id, from ``transformer/config.json`` (``_class_name``)
    or ``model_index.json`` (its ``transformer`` entry); None when neither names a known transformer."""
    from diffusers import ConfigMixin, DiffusionPipeline

    by_class = {f.transformer_class: f for f in FAMILIES.values()}
    path = str(pretrained_model_name_or_path)
    try:
        index = DiffusionPipeline.load_config(path)
        entry = index.get("transformer")
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] in by_class:
            return by_class[entry[1]]
    except (OSError, ValueError):
        pass

    class _Config(ConfigMixin):
        config_name = "config.json"

    try:
        return by_class.get(_Config.load_config(path, subfolder="transformer").get("_class_name"))
    except (OSError, ValueError):
        return None


def resolve_family(family: str | ModelFamily | None, pretrained_model_name_or_path: str | os.PathLike) -> ModelFamily:
    """``family`` (``"flux"``, ``"sd3"``, a :class:`ModelFamily`, or ``None`` / ``"auto"``: detect it).
    A family that contradicts the model's own config is an error."""
    if isinstance(family, ModelFamily):
        family = family.name
    detected = detect_family(pretrained_model_name_or_path)
    if family in (None, "auto"):
        if detected is None:
            raise ValueError(f"cannot tell the model family of {pretrained_model_name_or_path}: neither its "
                             f"model_index.json nor transformer/config.json names one of "
                             f"{', '.join(f.transformer_class for f in FAMILIES.values())}; pass --model_family "
                             f"({' or '.join(FAMILIES)})")
        return detected
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if detected is not None and detected.name != family:
        raise ValueError(f"{pretrained_model_name_or_path} is a {detected.name} model ({detected.transformer_class}), "
                         f"not {family}: drop --model_family or pass --model_family {detected.name}")
    return FAMILIES[family]


# ------------------------------------------------------------------------------------------
# encoders
# ------------------------------------------------------------------------------------------

class PromptEncoder:
    """The text half of a pipeline (its text encoders and tokenizers), loaded without the
    transformer and the VAE. ``family``: a name or :class:`ModelFamily`; default: detected.
    ``max_sequence_length``: T5 tokens; default: the family's (FLUX 512, SD3 256)."""

    def __init__(self, pretrained_model_name_or_path: str, device="cpu", dtype=torch.float32,
                 max_sequence_length: int | None = None, family: str | ModelFamily | None = None):
        self.family = resolve_family(family, pretrained_model_name_or_path)
        self.pipe = self.family.pipeline_cls().from_pretrained(pretrained_model_name_or_path, transformer=None,
                                                               vae=None, dtype=dtype).to(device)
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length or self.family.max_sequence_length
        limit = getattr(self.pipe, self.family.t5_tokenizer).model_max_length
        if self.max_sequence_length > limit:
            raise ValueError(f"max_sequence_length={self.max_sequence_length} exceeds the T5 tokenizer's {limit}")

    @torch.no_grad()
    def __call__(self, prompts: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` and ``pooled_prompt_embeds`` (plus the empty prompt's ``negative_*``
        with ``negative=True`` where the family samples with classifier-free guidance)."""
        return self.family.encode_prompt(self.pipe, prompts, self.device, self.max_sequence_length, negative)


class LatentEncoder:
    """The pipeline's VAE encoder: images in ``[-1, 1]`` -> posterior mean and std."""

    def __init__(self, pretrained_model_name_or_path: str, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(pretrained_model_name_or_path, subfolder="vae",
                                                 dtype=dtype).to(device).eval()
        self.vae.requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def config(self):
        return self.vae.config

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return {"latent_mean": dist.mean, "latent_std": dist.std}


def vae_scaling(pretrained_model_name_or_path: str) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)`` of the pipeline's VAE, read from its config only."""
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae")
    return float(cfg.get("shift_factor") or 0.0), float(cfg["scaling_factor"])


def latents_from_moments(mean: torch.Tensor, std: torch.Tensor, shift_factor: float, scaling_factor: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample of the VAE posterior, in the transformer's latent space: ``(mean + std * eps - shift) * scale``."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return ((mean.float() + std.float() * eps) - shift_factor) * scaling_factor
