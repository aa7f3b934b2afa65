"""High resolution by SDEdit (the paper's recipe) and the extrapolation tricks it uses.

:func:`generate_highres` generates a base image, then repeatedly resizes it, encodes it, noises
it to ``strength`` and denoises it at the new size (:func:`upscale`) with diffusers' own img2img
pipeline of the family (:func:`img2img_pipeline`) sharing the pipeline's components. The
upscaling stages can use NTK-scaled RoPE (FLUX only: :func:`ntk_rope`, a swap of the model's
``pos_embed``, undone afterwards), the proportional attention scale
(:func:`proportional_attention`), a fixed scheduler shift (:func:`fixed_shift_scheduler`)
instead of FLUX's resolution-dependent one, and VAE tiling (:func:`vae_tiling`). Every setting
is checked once, before anything runs (:func:`clear.inference.plan_generation`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, replace

import torch
from ..apply import apply_clear, remove_clear
from ..families import ModelFamily, family_of
from ..defaults import DEFAULT_MAX_PIXELS, DEFAULT_SHIFT, DEFAULT_STRENGTH, VAE_TILING_LATENTS
from .checks import check_sampling, pipeline_family, resolve_ntk_factor
from .pipeline import (ClearSpec, PipelineInfo, Plan, Result, check_weights_fit, clear_models, describe_pipeline,
                       plan_generation, result_settings, run_generate, timed_call, wants_vae_tiling)


# ------------------------------------------------------------------------------------------
# Resolution extrapolation: NTK-scaled RoPE, proportional attention, fixed shift, VAE tiling
# ------------------------------------------------------------------------------------------


def ntk_rope(models, ntk_factor: float | None):
    """Within the block, the given model(s) (or a pipeline's transformer and ControlNets)
    use NTK-scaled RoPE (their family's :meth:`clear.families.ModelFamily.ntk_rope`: FLUX's swaps
    ``pos_embed``); the original ``pos_embed`` objects are put back afterwards. ``ntk_factor`` 1 or
    ``None``: nothing changes (any model); another factor on a family without RoPE: ``TypeError``."""
    models = clear_models(models) if hasattr(models, "transformer") else (
        [models] if isinstance(models, torch.nn.Module) else list(models))
    return family_of(models[0]).ntk_rope(models, ntk_factor)


@contextlib.contextmanager
def proportional_attention(pipe, enabled: bool | str = True):
    """Within the block, attention logits are scaled by ``sqrt(log_L0(N) / d)`` (N tokens,
    L0 = the family's training length; down-sampled variants: the release's ``log_L0(10·N)``
    unless ``enabled="plain"``, see :meth:`clear.ClearAttention.scale`) in the pipeline's
    transformer and ControlNets. On a model without CLEAR this puts full-attention CLEAR
    (``radius=None``) on it for the block."""
    added, saved = [], []
    try:
        for m in clear_models(pipe):
            state = getattr(m, "clear_state", None)
            if state is None:
                if enabled:
                    apply_clear(m, None, proportional_attention=enabled)
                    added.append(m)
            else:
                saved.append((state.core, state.core.proportional_attention))
                state.core.proportional_attention = enabled
        yield
    finally:
        for core, old in saved:
            core.proportional_attention = old
        for m in added:
            remove_clear(m)


def fixed_shift_scheduler(scheduler, shift: float):
    """A copy of the flow-matching scheduler with a fixed timestep shift ``shift`` instead of
    FLUX's resolution-dependent (dynamic) shift, which explodes far beyond the training size
    (SD3's schedulers already use a fixed shift, 3.0 as released)."""
    return type(scheduler).from_config(scheduler.config, use_dynamic_shifting=False, shift=float(shift))


@contextlib.contextmanager
def vae_tiling(vae, enabled: bool):
    """Within the block, diffusers' own VAE tiling (``vae.enable_tiling()``, its tile sizes) is on or off;
    the VAE's setting is put back afterwards."""
    old = getattr(vae, "use_tiling", False)
    try:
        vae.enable_tiling() if enabled else vae.disable_tiling()
        yield
    finally:
        vae.enable_tiling() if old else vae.disable_tiling()


def img2img_pipeline(pipe, scheduler=None, family: ModelFamily | None = None):
    """diffusers' img2img pipeline of the family (``FluxImg2ImgPipeline``,
    ``StableDiffusion3Img2ImgPipeline``) sharing ``pipe``'s components (no copies, no dtype
    cast: unlike ``from_pipe``, which casts every shared module to its ``dtype`` argument).
    ``family``: the pipeline's, when known."""
    import diffusers

    family = family or pipeline_family(pipe)
    family.check_img2img()
    cls = getattr(diffusers, family.img2img_class)
    names = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in names}
    if scheduler is not None:
        components["scheduler"] = scheduler
    new = cls(**components)
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


# ------------------------------------------------------------------------------------------
# Low-resolution guidance: I-Max's projected flow
# ------------------------------------------------------------------------------------------


def _current_sigma(scheduler) -> float:
    """The noise level of the step the pipeline is at (flow-matching schedulers: ``sigmas``, ``step_index``,
    ``begin_index``, as FLUX's and SD3's img2img pipelines set them)."""
    index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
    return float(scheduler.sigmas[index])


def _low_pass(grid: torch.Tensor, factor: float) -> torch.Tensor:
    """What ``grid`` (``[B, C, h, w]``) keeps at ``factor`` times fewer cells a side: area-averaged down,
    bilinearly up again."""
    h, w = grid.shape[-2:]
    small = torch.nn.functional.adaptive_avg_pool2d(grid, (max(1, round(h / factor)), max(1, round(w / factor))))
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


@contextlib.contextmanager
def projected_flow(transformer, scheduler, weight: float, factor: float):
    """Within the block, one SDEdit stage follows the low-resolution image it starts from: I-Max's projected
    flow (Du et al., "I-Max: Maximize the Resolution Potential of Pre-trained Rectified Flow Transformers
    with Projected Flow", arXiv 2410.07536). At every step the clean image the transformer's velocity
    points to, ``x0 = x_t - sigma * v``, gets the low frequencies (``factor`` x fewer cells a side, the
    stage's upscaling factor) of the stage's input latents instead of its own, by
    ``weight * sigma / sigma_first`` (strongest at the first step, none at the last), and the velocity is
    recomputed from it: ``v' = v - w(sigma) * (L(ref) - L(x0)) / sigma``.

    The input latents are caught where the img2img pipeline noises them (``scheduler.scale_noise``), so
    any family whose img2img pipeline does that works (FLUX's and SD3's): packed FLUX tokens are
    matched to the ``[B, C, H, W]`` latents by pixel-unshuffling. Each pipeline call in the block noises
    its own input once, before its first step: that starts the call's own state (its reference and its
    ``sigma_first``), so a warm-up call in the same block (:func:`run_upscale`'s) leaves the next call's
    guidance as it would be alone. ``weight`` 0: nothing changes."""
    if not weight:
        yield
        return
    state: dict = {}  # the current pipeline call's: "reference", then "sigma_first" at its first step
    scale_noise = scheduler.scale_noise

    def catching_scale_noise(sample, timestep, noise=None):
        state.clear()  # a new call: nothing of the previous call's carries over
        state["reference"] = sample.detach()
        return scale_noise(sample, timestep, noise)

    def guide(module, args, kwargs, output):
        ref = state.get("reference")
        if ref is None:
            return output
        x_t = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        v = output[0] if isinstance(output, tuple) else output.sample
        sigma = _current_sigma(scheduler)
        state.setdefault("sigma_first", sigma)
        if sigma <= 0:
            return output
        b, c, hh, ww = ref.shape
        if x_t.dim() == 3:  # packed tokens [B, N, C * p * p] (FLUX): to a [B, C * p * p, H / p, W / p] grid
            p = math.isqrt(x_t.shape[-1] // c)
            h, w = hh // p, ww // p
            if p * p * c != x_t.shape[-1] or h * w != x_t.shape[1]:
                raise ValueError(f"low-resolution guidance: tokens {tuple(x_t.shape)} do not pack latents "
                                 f"{tuple(ref.shape)}")
            ref_grid = torch.nn.functional.pixel_unshuffle(ref, p)

            def to_grid(x):
                return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)

            def from_grid(g):
                return g.flatten(2).transpose(1, 2)
        else:
            ref_grid = ref

            def to_grid(x):
                return x

            def from_grid(g):
                return g
        x0 = to_grid(x_t.float()) - sigma * to_grid(v.float())
        ref_grid = ref_grid.to(x0).expand(x0.shape[0], *ref_grid.shape[1:])
        w_sigma = weight * sigma / state["sigma_first"]
        delta = _low_pass(ref_grid, factor) - _low_pass(x0, factor)
        guided = (v.float() - from_grid(w_sigma * delta / sigma)).to(v.dtype)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    scheduler.scale_noise = catching_scale_noise
    handle = transformer.register_forward_hook(guide, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        del scheduler.scale_noise  # the instance attribute: the class's method again


# ------------------------------------------------------------------------------------------
# SDEdit stages
# ------------------------------------------------------------------------------------------


def upscale(pipe, image, prompt: str, height: int, width: int, strength: float = DEFAULT_STRENGTH,
            steps: int | None = None, guidance: float | None = None, seed: int = 0,
            ntk_factor: float | None = None, proportional: bool | str = True, shift: float | None = DEFAULT_SHIFT,
            tiling: bool | None = None, max_sequence_length: int | None = None, warmup: bool = False,
            max_pixels: int | None = DEFAULT_MAX_PIXELS, info: PipelineInfo | None = None,
            lowres_guidance: float = 0.0, tiling_latents: int = VAE_TILING_LATENTS) -> Result:
    """One SDEdit stage: resize ``image`` to ``height x width`` (Lanczos), encode it, noise it
    to ``strength`` and denoise at the new size with the family's img2img pipeline on ``pipe``'s
    components (original or CLEAR, as the pipeline is). ``steps`` is the full schedule;
    ``int(steps * strength)`` of them run. ``ntk_factor`` (FLUX; ``None`` = 10, 1 = off; SD3
    has no RoPE: leave it ``None``), ``proportional`` attention, a fixed scheduler ``shift``
    (``None`` = the scheduler's own: FLUX's dynamic shift) and diffusers' VAE ``tiling``
    (``None``: on from ``tiling_latents`` latent cells, :func:`wants_vae_tiling`) apply to this
    call only; ``proportional``: ``True`` (the release's scale, see
    :class:`clear.ClearAttention`), ``"plain"`` or ``False``. ``warmup``: an untimed
    1-step call at the same size first. ``info``: the pipeline's
    :func:`clear.inference.describe_pipeline` as it is now, when the caller has it.
    ``lowres_guidance``: the weight of I-Max's projected flow toward the input image's low
    frequencies (:func:`projected_flow`; 0, the default: off)."""
    check_sampling(steps, guidance)
    info = info or describe_pipeline(pipe)
    steps, guidance, max_sequence_length = info.sampling(steps, guidance, max_sequence_length)
    info.check_size(height, width, max_pixels=max_pixels)
    ntk_factor = resolve_ntk_factor(info.family, ntk_factor)
    check_sampling(steps, strength=strength)
    return run_upscale(pipe, info, image, prompt, height, width, steps=steps, guidance=guidance,
                       max_sequence_length=max_sequence_length, strength=strength, ntk_factor=ntk_factor,
                       proportional=proportional, shift=shift, tiling=tiling, seed=seed, warmup=warmup,
                       lowres_guidance=lowres_guidance, tiling_latents=tiling_latents)


def run_upscale(pipe, info: PipelineInfo, image, prompt: str, height: int, width: int, *, steps: int,
                guidance: float, max_sequence_length: int, strength: float, ntk_factor: float | None,
                proportional: bool | str, shift: float | None, tiling: bool | None, seed: int = 0,
                warmup: bool = False, lowres_guidance: float = 0.0,
                tiling_latents: int = VAE_TILING_LATENTS) -> Result:
    """:func:`upscale` with its settings already resolved and checked (by :func:`upscale` or
    :func:`clear.inference.plan_generation`): no defaults, no checks."""
    from PIL import Image

    tiling = wants_vae_tiling(pipe, height, width, tiling, tiling_latents)
    if lowres_guidance < 0:
        raise ValueError(f"lowres_guidance must be >= 0 (0: off), got {lowres_guidance}")
    scheduler = fixed_shift_scheduler(pipe.scheduler, shift) if shift is not None else (
        type(pipe.scheduler).from_config(pipe.scheduler.config) if lowres_guidance else None)
    img2img = img2img_pipeline(pipe, scheduler, info.family)
    resized = image.convert("RGB").resize((width, height), Image.LANCZOS)
    factor = max(height / image.height, width / image.width)
    with info.family.ntk_rope(clear_models(pipe), ntk_factor), proportional_attention(pipe, proportional), \
            vae_tiling(pipe.vae, tiling), projected_flow(pipe.transformer, img2img.scheduler, lowres_guidance, factor):
        kwargs = dict(image=resized, prompt=prompt, height=height, width=width,
                      **info.family.guidance_kwargs(guidance), max_sequence_length=max_sequence_length)
        if warmup:
            timed_call(img2img, strength=1.0, num_inference_steps=1,
                        generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
        out, seconds = timed_call(img2img, strength=strength, num_inference_steps=steps,
                                   generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return Result(out, seconds, result_settings(
        info, seconds, prompt=prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
        max_sequence_length=max_sequence_length, strength=strength, ntk_factor=ntk_factor,
        proportional_attention=proportional, shift="dynamic" if shift is None else shift, vae_tiling=tiling,
        source_size=f"{image.height}x{image.width}", lowres_guidance=lowres_guidance))


@dataclass
class Stage:
    """One stage of :func:`generate_highres`: ``"base"`` (text-to-image) or ``"upscale"``."""

    kind: str
    height: int
    width: int
    result: Result
    source: object = None  # the (resized) input image of an upscale stage

    @property
    def image(self):
        return self.result.image

    @property
    def seconds(self) -> float:
        return self.result.seconds


def generate_highres(pipe, prompt: str, sizes, base_size: tuple[int, int] = (1024, 1024),
                     clear: ClearSpec | None = None, base_model: str = "original", base_image=None,
                     strength: float = DEFAULT_STRENGTH, steps: int | None = None, upscale_steps: int | None = None,
                     guidance: float | None = None, seed: int = 0, ntk_factor: float | None = None,
                     proportional: bool | str = True, shift: float | None = DEFAULT_SHIFT, tiling: bool | None = None,
                     max_sequence_length: int | None = None, warmup: bool = False,
                     progress: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     info: PipelineInfo | None = None, lowres_guidance: float = 0.0,
                     tiling_latents: int = VAE_TILING_LATENTS) -> list[Stage]:
    """The paper's high-resolution recipe: a base image at ``base_size`` (HEIGHT, WIDTH), then
    one :func:`upscale` stage per entry of ``sizes`` (e.g. ``[(2048, 2048), (4096, 4096)]``,
    any aspect ratios). ``clear``: the CLEAR to put on the pipeline before the upscaling
    stages (and before the base stage if ``base_model="clear"``); ``None`` uses the pipeline
    as it is. ``base_image``: start from this image instead of generating one. All sizes are
    checked before anything runs (and ``ntk_factor``: see :func:`upscale`), once
    (:func:`clear.inference.plan_generation`). ``warmup``: untimed 1-step calls before each
    timed one. ``info``: the pipeline's :func:`clear.inference.describe_pipeline`, when the
    caller has it. ``lowres_guidance``: I-Max's projected flow in every upscaling stage (see
    :func:`upscale`; 0: off). ``tiling`` / ``tiling_latents``: VAE tiling of the upscaling stages (see
    :func:`upscale`). Returns the stages, base first."""
    plan = plan_generation(info or pipe, base_size, sizes, clear, base_model, strength, steps, upscale_steps,
                           guidance, ntk_factor, proportional, shift, tiling, max_sequence_length, max_pixels,
                           lowres_guidance, tiling_latents=tiling_latents)
    return run_plan(pipe, prompt, plan, seed, warmup, base_image, progress)


def run_plan(pipe, prompt: str, plan: Plan, seed: int = 0, warmup: bool = False, base_image=None,
             progress: bool = True) -> list[Stage]:
    """Run a :class:`clear.inference.Plan` (checked when it was made; nothing is checked or
    resolved again): the base image (or ``base_image``), ``plan.clear`` put on the pipeline
    where the plan says, then the upscaling stages. Returns the stages, base first."""
    from tqdm.auto import tqdm

    info = plan.info

    def put_clear():
        plan.clear.apply(pipe, family=info.family.name)
        return replace(info, clear=plan.clear)

    if plan.base_model == "original" or base_image is not None:  # CLEAR loads after the base image: check it now
        check_weights_fit(pipe, plan.clear)
    stages = []
    with tqdm(total=len(plan.sizes) + 1, desc="high-res stages", disable=not (progress and plan.sizes)) as bar:
        if base_image is None:
            if plan.clear is not None and plan.base_model == "clear":
                info = put_clear()
            base = run_generate(pipe, info, prompt, *plan.base_size, plan.steps, plan.guidance,
                                plan.max_sequence_length, seed, warmup)
        else:
            base = Result(base_image, 0.0, dict(source="given"))
        stages.append(Stage("base", base.image.height, base.image.width, base))
        bar.update()
        if plan.clear is not None and (plan.base_model == "original" or base_image is not None):
            info = put_clear()
        image = base.image
        for h, w in plan.sizes:
            bar.set_postfix_str(f"{h}x{w}")
            res = run_upscale(pipe, info, image, prompt, h, w, steps=plan.upscale_steps, guidance=plan.guidance,
                              max_sequence_length=plan.max_sequence_length, strength=plan.strength,
                              ntk_factor=plan.ntk_factor, proportional=plan.proportional, shift=plan.shift,
                              tiling=plan.tiling, seed=seed, warmup=warmup, lowres_guidance=plan.lowres_guidance,
                              tiling_latents=plan.tiling_latents)
            stages.append(Stage("upscale", h, w, res, source=image))
            image = res.image
            bar.update()
    return stages
