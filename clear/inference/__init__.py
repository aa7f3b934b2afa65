"""Inference with CLEAR on stock diffusers pipelines: text-to-image and SDEdit high resolution.

Two families (:data:`clear.families.FAMILIES`): FLUX.1 (``FluxPipeline``, ``FluxImg2ImgPipeline``,
``FluxControlNetPipeline``; dev or schnell) and SD3 / SD3.5 (``StableDiffusion3Pipeline``;
SD3-Medium, SD3.5-Medium, SD3.5-Large). One line puts CLEAR on a pipeline::

    pipe = clear.inference.load_pipeline("black-forest-labs/FLUX.1-dev", device="cuda")
    clear.inference.apply_to_pipeline(pipe, radius=16, checkpoint=clear.inference.resolve_checkpoint("released", 16))
    image = clear.inference.generate(pipe, "a small blue plane", 1024, 1024).image

High resolution follows the paper's SDEdit recipe: generate at a base size, then
repeatedly resize the image, encode it, noise it to ``strength`` and denoise it at the
new size with diffusers' own img2img pipeline (``FluxImg2ImgPipeline``,
``StableDiffusion3Img2ImgPipeline``) sharing the same components. The upscaling stages
can use NTK-scaled RoPE (FLUX only, :func:`ntk_rope`, a swap of the model's ``pos_embed``,
undone afterwards; SD3 has no RoPE), the proportional attention scale, a fixed scheduler
shift instead of FLUX's resolution-dependent one, and VAE tiling. SD3's positions come from
a fixed table of ``pos_embed_max_size`` x ``pos_embed_max_size`` patches: larger images are
refused before anything loads::

    stages = clear.inference.generate_highres(pipe, "a small blue plane", sizes=[(2048, 2048), (4096, 4096)],
                                              clear=clear.inference.ClearSpec(16, checkpoint=path))

A pipeline is described once (:func:`describe_pipeline` -> :class:`PipelineInfo`: family,
released model, pixels per token, largest grid, defaults, the CLEAR on it) and a generation
is planned once (:func:`plan_generation` -> :class:`Plan`, every size checked once);
:func:`generate`, :func:`upscale`, :func:`generate_highres` take the description (``info=``)
or make it once. Everything that can be checked without loading weights (sizes and their
limits, the checkpoint's variant, family and dtypes, the model family and path, the presence
of the weights, radius, steps, guidance, the device, the output path) is checked first, by the
``check_*`` functions, :func:`size_rules` and :func:`resolve_checkpoint`; the checkpoint's
values (NaN / inf) when it loads; every generated image before it is returned
(:class:`NonFiniteImageError`).

The package: :mod:`.checks` (pre-flight checks, family facts, device and dtype),
:mod:`.pipeline` (describe, load, apply CLEAR, plan, generate, patch-parallel generation),
:mod:`.highres` (SDEdit stages and the extrapolation tricks), :mod:`.outputs` (PNGs with
their settings, grids, labels). This module is its public face.
"""

from ..defaults import (DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_NTK_FACTOR, DEFAULT_SHIFT, DEFAULT_STRENGTH,
                        VAE_TILING_LATENTS)
from ..devices import check_device, default_device, resolve_dtype
from .checks import (SUPPORTED_PIPELINES, SUPPORTED_TRANSFORMERS, check_checkpoint, check_model,
                     check_output_path, check_sampling, check_size, check_upscaling, checkpoint_family,
                     checkpoint_variant, parse_sizes, pipeline_family, resolve_checkpoint,
                     resolve_ntk_factor, size_multiple, size_rules)
from ..families.flux import NTKFluxPosEmbed, set_ntk_rope
from .highres import (Stage, fixed_shift_scheduler, generate_highres, img2img_pipeline, ntk_rope,
                      proportional_attention, run_plan, run_upscale, upscale, vae_tiling)
from .outputs import image_grid, png_metadata, save_png, timing_label
from .pipeline import (ClearSpec, NonFiniteImageError, PipelineInfo, Plan, Result, apply_to_pipeline, check_weights_fit,
                       clear_label,
                       clear_models, default_settings, describe_pipeline, finite_image, generate,
                       generate_patch_parallel, load_pipeline, model_name, model_spec, plan_generation,
                       remove_from_pipeline, run_generate, wants_vae_tiling)

__all__ = [
    # checks before anything loads
    "check_size", "check_upscaling", "check_sampling", "check_device", "check_output_path", "check_model",
    "check_checkpoint",
    "parse_sizes", "pipeline_family", "size_rules", "size_multiple", "checkpoint_variant", "checkpoint_family",
    "resolve_checkpoint", "resolve_ntk_factor", "default_device", "resolve_dtype",
    "SUPPORTED_PIPELINES", "SUPPORTED_TRANSFORMERS",
    # pipelines, CLEAR on them, generation
    "PipelineInfo", "describe_pipeline", "model_spec", "model_name", "default_settings", "load_pipeline",
    "clear_models", "apply_to_pipeline", "check_weights_fit", "remove_from_pipeline", "ClearSpec", "clear_label",
    "Plan", "plan_generation", "Result", "NonFiniteImageError", "finite_image", "generate", "run_generate",
    "generate_patch_parallel",
    # high resolution
    "upscale", "run_upscale", "Stage", "generate_highres", "run_plan", "NTKFluxPosEmbed", "set_ntk_rope", "ntk_rope",
    "proportional_attention", "fixed_shift_scheduler", "vae_tiling", "img2img_pipeline", "wants_vae_tiling",
    # outputs
    "png_metadata", "save_png", "image_grid", "timing_label",
    # defaults
    "DEFAULT_MODEL", "DEFAULT_STRENGTH", "DEFAULT_NTK_FACTOR", "DEFAULT_SHIFT", "DEFAULT_MAX_PIXELS",
    "VAE_TILING_LATENTS",
]
