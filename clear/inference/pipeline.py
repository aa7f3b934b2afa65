"""Pipelines and CLEAR on them: load a FLUX / SD3 pipeline, describe it once, put CLEAR on it,
plan a generation (every setting checked once, before anything runs) and generate.

* :class:`PipelineInfo` (:func:`describe_pipeline`): what generation needs to know about a
  pipeline (or a Hub id / local directory, from its configs): family, released model,
  pixels per token, largest grid, sampling defaults, the CLEAR on it. Resolved once and
  passed on: :func:`generate`, :func:`clear.inference.upscale` and
  :func:`clear.inference.generate_highres` take it (``info=``) or describe the pipeline once.
* :class:`Plan` (:func:`plan_generation`): one generation (a base image and any SDEdit
  stages), its defaults filled in and every size, sampling setting and the NTK factor checked
  once; :func:`clear.inference.run_plan` and :func:`generate_patch_parallel` run it.
* :func:`generate`: text-to-image with the pipeline as it is; NaN or inf in the latents or the
  image raise :class:`NonFiniteImageError` instead of giving a black picture.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..apply import apply_clear, remove_clear
from ..families import ModelFamily, ModelSpec, family_of, get_family
from ..geometry import Window
from ..defaults import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_SHIFT, DEFAULT_STRENGTH, VAE_TILING_LATENTS
from ..weights import check_clear_weights, load_clear_weights
from .. import parallel
from ..devices import resolve_device, resolve_dtype
from .checks import (check_checkpoint, check_sampling, check_size, check_upscaling, pipeline_family, resolve_ntk_factor,
                     size_rules)


# ------------------------------------------------------------------------------------------
# What CLEAR to put on a pipeline, and what a pipeline is
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClearSpec:
    """What CLEAR to put on a pipeline: window, checkpoint path (``None`` = untrained), backend;
    ``strict_radius=False`` loads a checkpoint that does not say its radius (or says another one)."""

    radius: float | None
    down_factor: int = 1
    checkpoint: str | None = None
    backend: str = "auto"
    strict_radius: bool = True

    def __post_init__(self):
        Window(self.radius, self.down_factor)  # radius > 0 (or None), down_factor >= 1: fails before any loading

    @property
    def label(self) -> str:
        if self.radius is None:
            return "original"
        return f"CLEAR r={self.radius:g}" + (f" df={self.down_factor}" if self.down_factor > 1 else "")

    def apply(self, pipe, family: str | None = None):
        """Put this CLEAR on ``pipe`` (:func:`apply_to_pipeline`; ``family``: the pipeline's, when known)."""
        return apply_to_pipeline(pipe, self.radius, self.down_factor, self.checkpoint, self.backend,
                                 strict_radius=self.strict_radius, family=family)


@dataclass(frozen=True)
class PipelineInfo:
    """What generation needs to know about a pipeline, resolved once by :func:`describe_pipeline`
    and passed on, instead of every call working out the family again."""

    family: ModelFamily  # the model family (``.name``: "flux" or "sd3")
    model: str  # the released model its transformer config is: the name of its clear.families.ModelSpec
    pixels_per_token: int  # per side: VAE factor x patch size
    max_grid: int | None  # most tokens per side (SD3's pos_embed_max_size); None: no table (FLUX's RoPE)
    steps: int  # the released model's sampling defaults
    guidance: float
    max_sequence_length: int  # T5 tokens
    clear: ClearSpec | None = None  # the CLEAR on the transformer (its checkpoint: None where not known)

    @property
    def down_factor(self) -> int:
        return self.clear.down_factor if self.clear is not None else 1

    @property
    def label(self) -> str:
        return self.clear.label if self.clear is not None else "original"

    def sampling(self, steps: int | None, guidance: float | None,
                 max_sequence_length: int | None) -> tuple[int, float, int]:
        """The given steps, guidance and text length, the model's defaults where ``None``."""
        return (self.steps if steps is None else steps, self.guidance if guidance is None else guidance,
                self.max_sequence_length if max_sequence_length is None else max_sequence_length)

    def check_size(self, height: int, width: int, down_factor: int | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        """:func:`check_size` with this model's rules (``down_factor``: the CLEAR on it unless given)."""
        check_size(height, width, self.pixels_per_token, self.down_factor if down_factor is None else down_factor,
                   self.max_grid, max_pixels)


def model_spec(family: ModelFamily | str, transformer_config) -> tuple[str, ModelSpec]:
    """Which released model a transformer config of ``family`` is, and its :class:`clear.families.ModelSpec`
    (sampling defaults, training length)."""
    spec = get_family(family).spec(transformer_config)
    return spec.name, spec


def model_name(transformer) -> str:
    """Which released model a transformer's config is (the name of its :class:`clear.families.ModelSpec`)."""
    return model_spec(family_of(transformer), transformer.config)[0]


def default_settings(pipe) -> dict:
    """Steps, guidance and text length for the pipeline's model (its :class:`clear.families.ModelSpec`):
    FLUX.1-dev 28 / 3.5 / 512, FLUX.1-schnell 4 / 0 / 256, SD3-Medium 28 / 7 / 256,
    SD3.5-Medium 40 / 4.5 / 256, SD3.5-Large 28 / 3.5 / 256 (the mini model of ckpt/mini: see its spec)."""
    return model_spec(family_of(pipe), pipe.transformer.config)[1].defaults()


def describe_pipeline(model_or_pipe) -> PipelineInfo:
    """The :class:`PipelineInfo` of a pipeline as it is (CLEAR included), or of a Hub id / local
    directory from its configs only (``model_index.json``, checked by :func:`check_model`;
    ``vae/`` and ``transformer/``; no weights)."""
    family = pipeline_family(model_or_pipe)
    pixels, max_grid = size_rules(model_or_pipe, family)
    if hasattr(model_or_pipe, "transformer"):
        config = model_or_pipe.transformer.config
        state = getattr(model_or_pipe.transformer, "clear_state", None)
        spec = None if state is None else ClearSpec(state.radius, state.down_factor, backend=state.core.backend)
    else:
        config, spec = family.transformer_config(model_or_pipe), None
    name, d = model_spec(family, config)
    return PipelineInfo(family, name, pixels, max_grid, d.steps, d.guidance, d.max_sequence_length, spec)


def clear_label(pipe) -> str:
    """``"original"`` or the CLEAR on the pipeline's transformer, e.g. ``"CLEAR r=16 df=4"``."""
    state = getattr(pipe.transformer, "clear_state", None)
    if state is None or state.radius is None:
        return "original"
    return ClearSpec(state.radius, state.down_factor).label


# ------------------------------------------------------------------------------------------
# Loading, and CLEAR on a pipeline
# ------------------------------------------------------------------------------------------


def load_pipeline(model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
                  offload: bool = False, check: bool = True, info: PipelineInfo | None = None):
    """The family's text-to-image pipeline (``FluxPipeline`` or ``StableDiffusion3Pipeline``)
    from a Hub id or local directory, on ``device`` in ``dtype`` (``offload``: model CPU
    offload instead of moving everything to the device). ``info``: the model's
    :func:`describe_pipeline`, when the caller has it (nothing is read twice); ``check=False``
    skips :func:`check_model` (already done) and trusts the config's transformer class."""
    import diffusers  # here: clear.inference imports without diffusers, so its checks answer fast

    device = str(resolve_device(device))  # before anything is read
    family = info.family if info is not None else pipeline_family(model, check=check)
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(model, dtype=resolve_dtype(dtype, device))
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def clear_models(pipe) -> list[torch.nn.Module]:
    """The models of a pipeline CLEAR applies to: ``pipe.transformer`` and every ControlNet."""
    models = [pipe.transformer]
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:
        models.extend(getattr(controlnet, "nets", [controlnet]))  # FluxMultiControlNetModel holds .nets
    return models


def apply_to_pipeline(pipe, radius: float | None, down_factor: int = 1, checkpoint: str | os.PathLike | None = None,
                      backend: str = "auto", proportional_attention: bool | str = False,
                      controlnet_weights: bool = True, strict_radius: bool = True, family: str | None = None):
    """Put CLEAR on a FLUX or SD3 pipeline in one line: :func:`clear.apply_clear` on
    ``pipe.transformer`` and on each ControlNet, then load ``checkpoint`` (a path, e.g. from
    :func:`resolve_checkpoint`; ``None`` = untrained CLEAR) into the transformer and, unless
    ``controlnet_weights=False``, zero-shot into each ControlNet too (its blocks are copies of
    the transformer's first ones; it takes the blocks it has). Works for FLUX.1-schnell with
    the FLUX.1-dev weights. Loading a checkpoint overwrites the attention projections:
    generate with the original model first. ``strict_radius=False``: load a checkpoint that does
    not say its radius, or says another one (see :func:`clear.load_clear_weights`). ``family``: the
    pipeline's family name, when known (the checkpoint is checked against it).
    Returns the transformer's :class:`clear.ClearAttention`."""
    if checkpoint is not None:
        if radius is None:
            raise ValueError("a CLEAR checkpoint needs a local window: pass the radius it was trained for")
        check_checkpoint(checkpoint, radius, down_factor, family or pipeline_family(pipe).name, strict_radius)
    models = clear_models(pipe)
    cores = [apply_clear(m, radius, down_factor, backend=backend, proportional_attention=proportional_attention)
             for m in models]
    if checkpoint is not None:
        for m in models if controlnet_weights else models[:1]:
            load_clear_weights(m, checkpoint, strict_radius=strict_radius)
    return cores[0]


def check_weights_fit(pipe, spec: ClearSpec | None) -> None:
    """Check ``spec``'s checkpoint against ``pipe``'s transformer from the file's header (keys, shapes,
    variant; nothing read or loaded), CLEAR put on and taken off again: for runs that generate with the
    original model before the checkpoint loads (``--compare``, an original base image), so that a file of
    another model fails before anything is generated. Nothing to do without a checkpoint, or when the
    transformer already has CLEAR."""
    transformer = pipe.transformer
    if spec is None or spec.checkpoint is None or getattr(transformer, "clear_state", None) is not None:
        return
    apply_clear(transformer, spec.radius, spec.down_factor, backend=spec.backend)
    try:
        check_clear_weights(transformer, spec.checkpoint, strict_radius=spec.strict_radius)
    finally:
        remove_clear(transformer)


def remove_from_pipeline(pipe) -> None:
    """Undo :func:`apply_to_pipeline`'s processors (loaded weights stay)."""
    for m in clear_models(pipe):
        if getattr(m, "clear_state", None) is not None:
            remove_clear(m)


# ------------------------------------------------------------------------------------------
# Plans: a generation resolved and checked before anything runs
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One generation, resolved and checked by :func:`plan_generation` before anything runs: a
    base image at ``base_size``, then one SDEdit stage per entry of ``sizes``, the model's
    defaults filled in. :func:`clear.inference.run_plan` runs it without checking again, for any
    prompt and seed; :meth:`with_clear` gives the same plan with another CLEAR it was checked for."""

    info: PipelineInfo
    base_size: tuple[int, int]
    sizes: tuple[tuple[int, int], ...]
    clear: ClearSpec | None  # the CLEAR put on the pipeline (before the base image if base_model="clear")
    base_model: str  # "original" or "clear"
    steps: int
    upscale_steps: int  # full schedule of each upscaling stage; int(upscale_steps * strength) run
    guidance: float
    max_sequence_length: int
    strength: float
    ntk_factor: float | None  # None: no NTK-scaled RoPE (SD3, or no upscaling stage)
    proportional: bool | str
    shift: float | None  # None: the scheduler's own
    tiling: bool | None  # None: VAE tiling from tiling_latents latent cells (clear.inference.wants_vae_tiling)
    lowres_guidance: float = 0.0  # I-Max's projected flow in each upscaling stage (0: off)
    tiling_latents: int = VAE_TILING_LATENTS  # tiling=None: VAE tiling from this many latent cells

    def with_clear(self, clear: ClearSpec | None) -> Plan:
        """This plan with ``clear`` instead of its own: ``None`` (the original model of a pipeline
        described without CLEAR: the sizes were checked for the stricter window) or the same
        window (e.g. with its checkpoint path). Another window needs a new :func:`plan_generation`."""
        window = None if clear is None else (clear.radius, clear.down_factor)
        if (clear is None and self.info.clear is not None) or (
                clear is not None and (self.clear is None or window != (self.clear.radius, self.clear.down_factor))):
            raise ValueError(f"this plan was checked for {self.clear.label if self.clear else 'no CLEAR'} on a "
                             f"pipeline with {self.info.label}, not for {clear.label if clear else 'the original'}: "
                             "make a new plan with plan_generation(..., clear=...)")
        return replace(self, clear=clear)


def wants_vae_tiling(pipe, height: int, width: int, tiling: bool | None = None,
                     tiling_latents: int = VAE_TILING_LATENTS) -> bool:
    """Whether an image of ``height x width`` pixels is decoded (and encoded) with VAE tiling: ``tiling`` when
    given, else whether its latents (``height / f x width / f``, ``f`` = ``pipe.vae_scale_factor``) have at
    least ``tiling_latents`` cells (:data:`clear.defaults.VAE_TILING_LATENTS` by default)."""
    if tiling is not None:
        return bool(tiling)
    f = pipe.vae_scale_factor
    return (height // f) * (width // f) >= tiling_latents


def plan_generation(model_or_pipe, base_size: tuple[int, int], sizes=(), clear: ClearSpec | None = None,
                    base_model: str = "original", strength: float = DEFAULT_STRENGTH, steps: int | None = None,
                    upscale_steps: int | None = None, guidance: float | None = None, ntk_factor: float | None = None,
                    proportional: bool | str = True, shift: float | None = DEFAULT_SHIFT, tiling: bool | None = None,
                    max_sequence_length: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    lowres_guidance: float = 0.0, tiling_latents: int = VAE_TILING_LATENTS) -> Plan:
    """Check and resolve a generation (see :func:`clear.inference.generate_highres` for the
    arguments) for a :class:`PipelineInfo`, a pipeline or a Hub id / local directory (its
    configs only): first what needs no model (steps, guidance), then the model
    (:func:`describe_pipeline`), every size once (the base size with the window of the base
    model), the NTK factor (upscaling stages only, or when given: SD3 has no RoPE) and the
    strength against the number of upscaling steps."""
    if base_model not in ("original", "clear"):
        raise ValueError(f"base_model must be 'original' or 'clear', got {base_model!r}")
    sizes = tuple(tuple(map(int, s)) for s in sizes)
    check_sampling(steps, guidance, upscale_steps=upscale_steps)
    info = model_or_pipe if isinstance(model_or_pipe, PipelineInfo) else describe_pipeline(model_or_pipe)
    df = clear.down_factor if clear is not None else info.down_factor
    info.check_size(*base_size, df if (base_model == "clear" or clear is None) else 1, max_pixels)
    check_upscaling(base_size, sizes)
    for h, w in sizes:
        info.check_size(h, w, df, max_pixels)
    if sizes:
        info.family.check_img2img()
    if sizes or ntk_factor is not None:
        ntk_factor = resolve_ntk_factor(info.family, ntk_factor)
    if shift is not None and not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift={shift:g}: the scheduler shift of the upscaling stages must be a finite number > 0 "
                         f"(the release uses {DEFAULT_SHIFT:g}), or 'dynamic'")
    info.family.check_text_length(max_sequence_length)
    steps, guidance, max_sequence_length = info.sampling(steps, guidance, max_sequence_length)
    upscale_steps = steps if upscale_steps is None else upscale_steps
    if sizes:
        check_sampling(upscale_steps=upscale_steps, strength=strength)
    if not lowres_guidance >= 0:
        raise ValueError(f"lowres_guidance must be >= 0 (0: off), got {lowres_guidance}")
    if tiling_latents < 0:
        raise ValueError(f"tiling_latents must be >= 0 (latent cells from which VAE tiling is on; 0: always), got "
                         f"{tiling_latents}")
    return Plan(info, tuple(base_size), sizes, clear, base_model, steps, upscale_steps, guidance, max_sequence_length,
                strength, ntk_factor, proportional, shift, tiling, float(lowres_guidance), int(tiling_latents))


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One generated image, how long the pipeline call took, and the settings that made it."""

    image: object  # PIL.Image
    seconds: float
    settings: dict = field(default_factory=dict)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class NonFiniteImageError(ValueError):
    """A generation produced NaN or inf values (latents during denoising, or the decoded image):
    an error instead of a black image."""


_NON_FINITE_HINT = ("Likely causes: CLEAR weights that blow up (e.g. a diverged distillation; try another "
                    "checkpoint), float16 overflow (use --dtype bfloat16 or float32), or a non-finite setting")


def _finite_latents_callback(pipe, step, timestep, callback_kwargs):
    """``callback_on_step_end`` that stops a generation at the first step whose latents are not finite."""
    latents = callback_kwargs.get("latents")
    if latents is not None and not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        raise NonFiniteImageError(f"the latents hold {bad} NaN/inf values of {latents.numel()} after denoising step "
                                  f"{step + 1} (timestep {float(timestep):g}): the image would be black or noise, so "
                                  f"generation stops here and no image is returned. {_NON_FINITE_HINT}")
    return callback_kwargs


def finite_image(pipe, images):
    """The first image of a pipeline's ``output_type="np"`` output as PIL, after checking that
    every value is finite (NaN would become black pixels without a word)."""
    arr = np.asarray(images)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise NonFiniteImageError(f"the decoded image holds {bad} NaN/inf values of {arr.size}: it would be saved as "
                                  f"a black image, so no image is returned. {_NON_FINITE_HINT}")
    return pipe.numpy_to_pil(arr)[0]


def timed_call(pipe, **kwargs) -> tuple[object, float]:
    """One pipeline call, timed; the latents are checked after every step and the decoded image
    at the end (:class:`NonFiniteImageError`)."""
    if "callback_on_step_end" not in kwargs:
        kwargs.update(callback_on_step_end=_finite_latents_callback, callback_on_step_end_tensor_inputs=["latents"])
    device = pipe._execution_device
    _sync(device)
    t0 = time.perf_counter()
    images = pipe(output_type="np", **kwargs).images
    _sync(device)
    seconds = time.perf_counter() - t0
    return finite_image(pipe, images), seconds


def result_settings(info: PipelineInfo, seconds: float, **values) -> dict:
    """The settings of one generated image: ``values``, the attention used, the seconds, the CLEAR window."""
    settings = dict(values, attention=info.label, seconds=round(seconds, 3))
    if info.clear is not None:
        settings.update(radius=info.clear.radius, down_factor=info.clear.down_factor, backend=info.clear.backend)
    return settings


def generate(pipe, prompt: str, height: int, width: int, steps: int | None = None, guidance: float | None = None,
             seed: int = 0, max_sequence_length: int | None = None, warmup: bool = False,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, info: PipelineInfo | None = None, **pipe_kwargs) -> Result:
    """Text-to-image with the pipeline as it is (original or CLEAR). Seeded on the CPU, so
    the same seed gives the same starting noise on any device. ``warmup``: an untimed
    1-step call at the same size first (compilation, autotuning), for fair timings. Settings
    are checked first (:func:`check_sampling`, :func:`check_size` with ``max_pixels``); NaN or
    inf in the latents or the image raise :class:`NonFiniteImageError`. ``info``: the
    pipeline's :func:`describe_pipeline` as it is now, when the caller has it."""
    check_sampling(steps, guidance)
    info = info or describe_pipeline(pipe)
    steps, guidance, max_sequence_length = info.sampling(steps, guidance, max_sequence_length)
    info.check_size(height, width, max_pixels=max_pixels)
    return run_generate(pipe, info, prompt, height, width, steps, guidance, max_sequence_length, seed, warmup,
                        **pipe_kwargs)


def run_generate(pipe, info: PipelineInfo, prompt: str, height: int, width: int, steps: int, guidance: float,
                 max_sequence_length: int, seed: int = 0, warmup: bool = False, **pipe_kwargs) -> Result:
    """:func:`generate` with its settings already resolved and checked (by :func:`generate` or
    :func:`plan_generation`): no defaults, no checks."""
    kwargs = dict(prompt=prompt, height=height, width=width, **info.family.guidance_kwargs(guidance, pipe_kwargs),
                  max_sequence_length=max_sequence_length, **pipe_kwargs)
    if warmup:
        timed_call(pipe, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    image, seconds = timed_call(pipe, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                                 **kwargs)
    return Result(image, seconds, result_settings(info, seconds, prompt=prompt, height=height, width=width, steps=steps,
                                            guidance=guidance, seed=seed, max_sequence_length=max_sequence_length))


def generate_patch_parallel(pipe, prompt: str, plan: Plan, seed: int = 0, warmup: bool = False,
                            text_mode: str = "exact") -> Result | None:
    """A single image of ``plan`` (no upscaling stages) with a FLUX pipeline split over the
    ranks of ``torch.distributed`` (:mod:`clear.parallel`, launched with torchrun): ``plan.clear``
    is put on the pipeline, every rank denoises its band of image rows, rank 0 decodes (VAE
    tiling per ``plan.tiling``) and gets the :class:`Result` (settings as :func:`generate`'s,
    plus ``parallel``, ``world_size``, ``text_mode``); the other ranks get ``None``. Every rank
    calls this with the same arguments; the transformer is single-process again afterwards."""
    if plan.sizes:
        raise ValueError("patch parallelism generates one image: drop the upscaling stages")
    info = plan.info
    if plan.clear is not None:
        plan.clear.apply(pipe, family=info.family.name)
        info = replace(info, clear=plan.clear)
    parallel.parallelize(pipe.transformer, text_mode=text_mode)
    try:
        call = dict(prompt=prompt, height=plan.base_size[0], width=plan.base_size[1],
                    vae_tiling=wants_vae_tiling(pipe, *plan.base_size, plan.tiling, plan.tiling_latents),
                    guidance_scale=plan.guidance, max_sequence_length=plan.max_sequence_length, output_type="np")
        for n in ([1] if warmup else []) + [plan.steps]:
            start = time.perf_counter()
            out = parallel.patch_parallel_pipeline_call(pipe, num_inference_steps=n, **call,
                                                        generator=torch.Generator("cpu").manual_seed(seed))
            seconds = time.perf_counter() - start
    finally:
        parallel.unparallelize(pipe.transformer)
    if out is None:
        return None
    image = finite_image(pipe, out.images)  # NaN / inf: an error, not a black PNG
    world = torch.distributed.get_world_size()
    settings = result_settings(info, seconds, prompt=prompt, height=plan.base_size[0], width=plan.base_size[1],
                         steps=plan.steps, guidance=plan.guidance, seed=seed,
                         max_sequence_length=plan.max_sequence_length)
    settings.update(attention=f"{info.label} patch-parallel x{world} ({text_mode})", parallel="patch",
                    world_size=world, text_mode=text_mode)
    return Result(image, seconds, settings)
