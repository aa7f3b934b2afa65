"""What the mini recipe measures that the project's scripts do not: the function-level distillation
error, image MSE, the score of the scenes (kind accuracy, placement, background), and which attention
backend is fastest on this machine.

* :func:`velocity_errors`: on held-out prompts, the teacher's own images (VAE-encoded, as training
  encodes its data), fresh noise and timesteps spread evenly over ``(0, 1)``, the MSE of each
  student's transformer output against the teacher's: ``L_distill`` of :mod:`clear.distill`, on
  data never trained on. Every model sees the same noisy inputs.
* :func:`image_mse`: mean per-image MSE (pixels in ``[0, 1]``) against a reference folder, paired by
  file stem (:func:`clear.evaluation.list_images`).
* :func:`scene_scores`: :func:`clear.mini.scenes.score_images` of every image against its scene: kind
  accuracy, placement, background.
* :func:`pick_backend`: times one transformer forward per CLEAR backend (``clear.backends.names()``)
  at one size and returns the fastest, so that every later call uses it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import clear
from clear import backends
from clear.evaluation import list_images, read_image
from clear.encoders import LatentEncoder, PromptEncoder, latents_from_moments, vae_scaling
from clear.families import FAMILIES

FLUX = FAMILIES["flux"]


def load_transformer(model_dir: str, radius: float | None = None, down_factor: int = 1,
                     checkpoint: str | Path | None = None, backend: str = "dense", base=None):
    """The pipeline's transformer (a copy of ``base`` when given), with CLEAR ``radius`` /
    ``down_factor`` applied and ``checkpoint`` loaded (``radius=None``: the teacher)."""
    from diffusers import FluxTransformer2DModel

    model = copy.deepcopy(base) if base is not None else FluxTransformer2DModel.from_pretrained(
        model_dir, subfolder="transformer")
    model.eval().requires_grad_(False)
    if radius is not None:
        clear.apply_clear(model, radius=radius, down_factor=down_factor, backend=backend)
        if checkpoint is not None:
            clear.load_clear_weights(model, checkpoint)
    return model


def _to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float ``[3, H, W]`` in ``[-1, 1]`` (the training images' range)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@torch.no_grad()
def velocity_errors(model_dir: str, teacher, students: dict, prompts: list[str], images: list, sigmas: list[float],
                    seed: int, max_sequence_length: int, batch_size: int = 8, progress: bool = True) -> dict:
    """``{name: {"mse", "relative", "per_sigma"}}`` for every student: the mean squared difference of
    its prediction and the teacher's over every (prompt, sigma) pair; ``relative`` divides it by the
    mean square of the teacher's prediction. ``images``: the teacher's images for ``prompts`` (PIL),
    the clean samples ``x0`` that are noised to each sigma."""
    text = PromptEncoder(model_dir, max_sequence_length=max_sequence_length, family=FLUX)
    vae = LatentEncoder(model_dir)
    shift, scale = vae_scaling(model_dir)
    guidance = FLUX.training_guidance(teacher.config, FLUX.default_guidance_scale(teacher.config))
    generator = torch.Generator().manual_seed(seed)
    sq = {name: np.zeros(len(sigmas)) for name in students}
    ref_sq, count = np.zeros(len(sigmas)), 0
    bar = tqdm(total=len(prompts) * len(sigmas), desc="held-out velocity error", unit="input", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        emb = text(chunk)
        moments = vae(torch.stack([_to_tensor(im) for im in images[start: start + len(chunk)]]))
        x0 = latents_from_moments(moments["latent_mean"], moments["latent_std"], shift, scale, generator)
        for j, sigma in enumerate(sigmas):
            noise = torch.randn(x0.shape, generator=generator)
            noisy = (1 - sigma) * x0 + sigma * noise
            inputs = FLUX.transformer_inputs(noisy, torch.full((len(chunk),), sigma * 1000.0), emb["prompt_embeds"],
                                             emb["pooled_prompt_embeds"], guidance)
            ref = teacher(**inputs)[0]
            ref_sq[j] += ref.pow(2).mean(dim=(1, 2)).sum().item()
            for name, model in students.items():
                sq[name][j] += (model(**inputs)[0] - ref).pow(2).mean(dim=(1, 2)).sum().item()
            bar.update(len(chunk))
        count += len(chunk)
    bar.close()
    ref_ms = ref_sq.sum() / (count * len(sigmas))
    return {name: {"mse": float(v.sum() / (count * len(sigmas))),
                   "relative": float(v.sum() / (count * len(sigmas)) / ref_ms),
                   "per_sigma": {f"{s:.3f}": float(x / count) for s, x in zip(sigmas, v)}}
            for name, v in sq.items()}


def image_mse(reference: str | Path, folder: str | Path) -> dict:
    """Mean per-image MSE (pixel values in ``[0, 1]``) of ``folder``'s images against ``reference``'s,
    paired by file stem; ``{"mse", "images"}``."""
    ref, other = list_images(reference), list_images(folder)
    stems = sorted(set(ref) & set(other))
    if not stems:
        raise ValueError(f"no image of {folder} pairs with one of {reference} (images pair by file stem)")
    errors = [(read_image(ref[s]).float() / 255 - read_image(other[s]).float() / 255).pow(2).mean().item()
              for s in stems]
    return {"mse": float(np.mean(errors)), "images": len(stems)}


def scene_scores(folder: str | Path, scenes: dict) -> dict:
    """:func:`clear.mini.scenes.score_images` of the images in ``folder`` against ``scenes[stem]``: ``{"kind_accuracy",
    "placement", "background", "shapes", "images", "per_image": {stem: {"kind_accuracy", "placement",
    "background"}}}`` (kind accuracy and placement pooled over the named shapes)."""
    from PIL import Image

    from .scenes import score_images

    found = list_images(folder)
    missing = sorted(set(scenes) - set(found))
    if missing:
        raise ValueError(f"{folder} lacks the images {missing[:5]}: run the recipe again to make them")
    stems = list(scenes)
    images = []
    for stem in stems:
        with Image.open(found[stem]) as im:
            images.append(im.convert("RGB"))
    out = score_images(images, [scenes[k] for k in stems])
    out["per_image"] = dict(zip(stems, out["per_image"]))
    return out


def _forward_inputs(transformer, size: int, pixels_per_token: int, text_len: int) -> dict:
    cfg = transformer.config
    grid = size // pixels_per_token
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels // 4, 2 * grid, 2 * grid, generator=g)
    guidance = FLUX.training_guidance(cfg, FLUX.default_guidance_scale(cfg))
    return FLUX.transformer_inputs(latents, torch.full((1,), 500.0),
                                   torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
                                   torch.randn(1, cfg.pooled_projection_dim, generator=g), guidance)


@torch.no_grad()
def pick_backend(base, radius: float, down_factor: int, size: int, pixels_per_token: int, text_len: int,
                 repeats: int = 2) -> tuple[str, dict]:
    """The fastest CLEAR backend for one forward of ``base`` (a FLUX transformer, unchanged) at
    ``size`` pixels a side: ``(name, {backend: seconds per forward})``, each timed after one
    untimed forward (compilation, caches). A backend that fails here is reported, not chosen."""
    times = {}
    for backend in backends.names():
        model = load_transformer("", radius, down_factor, backend=backend, base=base)
        inputs = _forward_inputs(model, size, pixels_per_token, text_len)
        try:
            model(**inputs)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model(**inputs)
            times[backend] = (time.perf_counter() - t0) / repeats
        except Exception as e:  # noqa: BLE001 - e.g. a backend this torch build lacks: not chosen
            times[backend] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    timed = {b: t for b, t in times.items() if isinstance(t, float)}
    if not timed:
        raise RuntimeError(f"no CLEAR backend runs here: {times}")
    return min(timed, key=timed.get), times
