"""Turn prompts and images into what a diffusion transformer consumes, with the pipeline's own encoders.

* :class:`PromptEncoder`: the pipeline's text encoders (FLUX: CLIP pooled + T5 tokens; SD3:
  CLIP-L + CLIP-G + T5; FLUX.2: Mistral / Qwen3 tokens; Qwen-Image: Qwen2.5-VL tokens and their mask),
  as its own ``encode_prompt``, at the text length of the model being used
  (its :class:`clear.families.ModelSpec`: FLUX.1-dev 512, FLUX.1-schnell 256, SD3 256).
* :class:`LatentEncoder`: the VAE posterior of an image (mean and std), which the cache
  stores so that training can still sample ``z = mean + std * eps`` afresh every step (FLUX.2: the
  pipeline's mode, std 0).
* :func:`latents_from_moments`: that sample, shifted and scaled as the transformer expects.
* :func:`plan_cache` / :func:`run_cache`: the one implementation behind ``scripts/cache_prompt_embeds.py`` and
  ``scripts/cache_latent_codes.py``.

Used by the data and cache scripts, by ``scripts/distill.py`` when it reads raw prompts and
images, and to encode the validation prompts once. What differs between families comes from
:mod:`clear.families`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import (LATENT_CODES, PROMPT_EMBEDS, CacheReport, default_cache_dir, read_image, read_prompt,
                   write_feature_cache)
from .families import ModelFamily, resolve_family
from .devices import rank_device
from .shards import dist_env, index_samples


class PromptEncoder:
    """The text half of a pipeline (its text encoders and tokenizers), loaded without the
    transformer and the VAE. ``family``: a name or :class:`ModelFamily`; default: detected.
    ``max_sequence_length``: T5 tokens; default: the model's (its spec: FLUX.1-dev 512,
    FLUX.1-schnell 256, SD3 256)."""

    def __init__(self, pretrained_model_name_or_path: str, device="cpu", dtype=torch.float32,
                 max_sequence_length: int | None = None, family: str | ModelFamily | None = None):
        self.family = resolve_family(family, pretrained_model_name_or_path)
        self.pipe = self.family.folder_pipeline_cls(pretrained_model_name_or_path).from_pretrained(
            pretrained_model_name_or_path, transformer=None, vae=None, dtype=dtype).to(device)
        self.device = torch.device(device)
        self.family.check_text_length(max_sequence_length)
        self.max_sequence_length = (self.family.model_spec(pretrained_model_name_or_path).max_sequence_length
                                    if max_sequence_length is None else max_sequence_length)
        limit = getattr(self.pipe, self.family.t5_tokenizer).model_max_length
        if self.max_sequence_length > limit:
            raise ValueError(f"max_sequence_length={self.max_sequence_length} exceeds the T5 tokenizer's {limit}")

    @torch.no_grad()
    def __call__(self, prompts: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
        """The family's :attr:`~clear.families.ModelFamily.prompt_features` (FLUX.1 / SD3 ``prompt_embeds`` and
        ``pooled_prompt_embeds``; FLUX.2 ``prompt_embeds``; Qwen-Image ``prompt_embeds`` and ``prompt_embeds_mask``),
        plus the empty prompt's ``negative_*`` with ``negative=True`` where the family samples with
        classifier-free guidance."""
        return self.family.encode_prompt(self.pipe, prompts, self.device, self.max_sequence_length, negative)


class LatentEncoder:
    """The pipeline's VAE encoder: images in ``[-1, 1]`` -> ``latent_mean`` and ``latent_std`` as the family
    encodes them (:meth:`clear.families.ModelFamily.encode_image`: FLUX.1 / SD3 the AutoencoderKL posterior;
    FLUX.2 Flux2Pipeline's patchified, batch-normalised latents; Qwen-Image the normalised posterior). The
    pipeline is loaded with its VAE only."""

    def __init__(self, pretrained_model_name_or_path: str, device="cpu", dtype=torch.float32,
                 family: str | ModelFamily | None = None):
        self.family = resolve_family(family, pretrained_model_name_or_path)
        self.pipe = self.family.folder_pipeline_cls(pretrained_model_name_or_path).from_pretrained(
            pretrained_model_name_or_path, transformer=None, **{c: None for c in self.family.text_components},
            dtype=dtype).to(device)
        self.vae.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def config(self):
        return self.vae.config

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.family.encode_image(self.pipe, images.to(self.device, self.dtype))


def vae_scaling(pretrained_model_name_or_path: str, family: str | ModelFamily | None = None) -> tuple[float, float]:
    """``(shift, scale)`` that put a sample of :class:`LatentEncoder`'s moments into the transformer's latent
    space (:meth:`clear.families.ModelFamily.latent_scaling`), read from configs only."""
    return resolve_family(family, pretrained_model_name_or_path).latent_scaling(pretrained_model_name_or_path)


def latents_from_moments(mean: torch.Tensor, std: torch.Tensor, shift_factor: float, scaling_factor: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample of the VAE posterior, in the transformer's latent space: ``(mean + std * eps - shift) * scale``."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return ((mean.float() + std.float() * eps) - shift_factor) * scaling_factor


# ------------------------------------------------------------------------------------------
# the feature caches (scripts/cache_prompt_embeds.py, scripts/cache_latent_codes.py)
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheJob:
    """One rank's share of caching ``kind`` (:data:`clear.data.PROMPT_EMBEDS` or
    :data:`clear.data.LATENT_CODES`) for a training set, checked before any weights load."""

    kind: str
    model: str
    family: ModelFamily
    samples: list
    cache_dir: Path
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    max_sequence_length: int | None  # prompt embeddings: T5 tokens (the model's own)
    resolution: int | None  # latent codes: image size

    @property
    def label(self) -> str:
        what = "prompt embeddings" if self.kind == PROMPT_EMBEDS else "latent codes"
        return f"{what} in {self.cache_dir}"


def plan_cache(kind: str, pretrained_model_name_or_path: str, data_root, cache_dir=None, model_family="auto",
               batch_size: int = 8, dtype: str | None = None, max_sequence_length: int | None = None,
               resolution: int | None = None) -> CacheJob:
    """Everything checked that can be without weights: the family (read from the model or given),
    the size (latent codes), the samples; this process's rank and device (torchrun / accelerate
    environment). ``max_sequence_length`` ``None``: the model's own (:class:`clear.families.ModelSpec`)."""
    if kind not in (PROMPT_EMBEDS, LATENT_CODES):
        raise ValueError(f"unknown cache kind {kind!r}; use {PROMPT_EMBEDS!r} or {LATENT_CODES!r}")
    rank, world, local_rank = dist_env()
    device, torch_dtype = rank_device(local_rank, dtype)
    family = resolve_family(model_family, pretrained_model_name_or_path)
    family.check_trains_from_data()
    if kind == LATENT_CODES:
        family.check_size(pretrained_model_name_or_path, resolution)
    else:
        family.check_text_length(max_sequence_length)
        if max_sequence_length is None:
            max_sequence_length = family.model_spec(pretrained_model_name_or_path).max_sequence_length
    samples = index_samples(data_root)
    return CacheJob(kind, str(pretrained_model_name_or_path), family, samples,
                    Path(cache_dir or default_cache_dir(data_root)), rank, world, device, torch_dtype, batch_size,
                    max_sequence_length if kind == PROMPT_EMBEDS else None,
                    resolution if kind == LATENT_CODES else None)


def run_cache(job: CacheJob, progress: bool = True) -> CacheReport:
    """Encode and write the job's samples that have no cache file yet (resumable; each file atomic),
    with the model, family and T5 length or resolution in each file's metadata."""
    metadata = {"model": job.model, "family": job.family.name}
    if job.kind == PROMPT_EMBEDS:
        encoder = PromptEncoder(job.model, job.device, job.dtype, job.max_sequence_length, job.family)
        read, encode = read_prompt, encoder
        metadata["max_sequence_length"] = encoder.max_sequence_length
    else:
        vae = LatentEncoder(job.model, job.device, job.dtype, job.family)
        read, encode = functools.partial(read_image, resolution=job.resolution), lambda im: vae(torch.stack(im))
        metadata["resolution"] = job.resolution
    return write_feature_cache(job.samples, job.kind, job.cache_dir, read=read, encode=encode,
                               batch_size=job.batch_size, rank=job.rank, world_size=job.world_size,
                               metadata=metadata, progress=progress)
