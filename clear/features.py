"""Turn prompts and images into what a FLUX transformer consumes, with the pipeline's own encoders.

* :class:`PromptEncoder`: CLIP pooled + T5 token embeddings (``FluxPipeline.encode_prompt``).
* :class:`LatentEncoder`: the VAE posterior of an image (mean and std), which the cache
  stores so that training can still sample ``z = mean + std * eps`` afresh every step.
* :func:`latents_from_moments`: that sample, shifted and scaled as the transformer expects.

Used by the cache scripts, by ``scripts/distill.py`` when it reads raw prompts and images,
and to encode the validation prompts once.
"""

from __future__ import annotations

import torch


class PromptEncoder:
    """The text half of a FLUX pipeline (CLIP + T5 and their tokenizers), loaded without
    the transformer and the VAE."""

    def __init__(self, pretrained_model_name_or_path: str, device="cpu", dtype=torch.float32,
                 max_sequence_length: int = 512):
        from diffusers import FluxPipeline

        self.pipe = FluxPipeline.from_pretrained(pretrained_model_name_or_path, transformer=None, vae=None,
                                                 dtype=dtype).to(device)
        self.device, self.max_sequence_length = torch.device(device), max_sequence_length
        limit = self.pipe.tokenizer_2.model_max_length
        if max_sequence_length > limit:
            raise ValueError(f"max_sequence_length={max_sequence_length} exceeds the T5 tokenizer's {limit}")

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                           max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


class LatentEncoder:
    """The FLUX VAE's encoder: images in ``[-1, 1]`` -> posterior mean and std."""

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
