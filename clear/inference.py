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

Everything that can be checked without loading weights (sizes and their limits, the
checkpoint's variant, family and dtypes, the model family and path, the presence of the
weights, radius, steps, guidance, the device, the output path) is checked first, by the
``check_*`` functions, :func:`size_rules` and :func:`resolve_checkpoint`; the checkpoint's
values (NaN / inf) when it loads; every generated image before it is returned
(:class:`NonFiniteImageError`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .apply import apply_clear, remove_clear
from .families import FAMILIES, ModelFamily, family_of, family_of_checkpoint, get_family
from .families import flux as _flux
from .families.flux import NTKFluxPosEmbed, set_ntk_rope  # noqa: F401 (public names of clear.inference)
from .geometry import Window
from .models import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_NTK_FACTOR, DEFAULT_SHIFT, DEFAULT_STRENGTH  # noqa: F401
from .weights import (RELEASED, Variant, download_weights, file_variant, hub_unreachable, load_clear_weights,
                      read_header, unverified_radius_message)

logger = logging.getLogger(__name__)


# Pipelines (model_index.json ``_class_name``) generate.py can load, and their transformers.
SUPPORTED_PIPELINES = tuple(p for f in FAMILIES.values() for p in f.pipelines)
SUPPORTED_TRANSFORMERS = tuple(f.transformer_class for f in FAMILIES.values())


VAE_TILING_PIXELS = 2048 * 2048  # vae_tiling=None turns tiling on above this many pixels


# ------------------------------------------------------------------------------------------
# Checks that run before any weights are loaded
# ------------------------------------------------------------------------------------------


def check_size(height: int, width: int, multiple: int = 16, down_factor: int = 1, max_grid: int | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Image sizes must be multiples of ``multiple`` pixels (FLUX and SD3: 16 = VAE factor 8 x
    patch 2; see :func:`size_rules`), at most ``max_grid`` tokens per side where the model has
    such a limit (SD3's ``pos_embed_max_size``), at most ``max_pixels`` pixels in all
    (:data:`DEFAULT_MAX_PIXELS` = 16384²; ``None``: no bound), and with ``down_factor`` the
    token grid (pixels / multiple) must be divisible by it."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % multiple:
            fix = f"e.g. {max(multiple, round(v / multiple) * multiple)}" if isinstance(v, int) and v > 0 else ""
            raise ValueError(f"{name}={v} is not a positive multiple of {multiple} pixels, which this model needs "
                             f"(VAE factor x patch size); choose another {name} {fix}".rstrip())
    if max_grid is not None and max(height, width) > max_grid * multiple:
        limit = max_grid * multiple
        raise ValueError(f"{height}x{width} pixels is a {height // multiple}x{width // multiple} token grid, larger "
                         f"than this model's positional embedding table of {max_grid}x{max_grid} tokens "
                         f"(pos_embed_max_size={max_grid} in its transformer config): it generates at most {limit} "
                         f"pixels per side; choose height and width <= {limit}")
    if max_pixels is not None and height * width > max_pixels:
        side = math.isqrt(max_pixels)
        raise ValueError(f"{height}x{width} is {height * width:,} pixels, more than the bound of {max_pixels:,} "
                         f"(max_pixels, about {side}x{side}): that far out, one image's latents, activations and "
                         "decoded pixels run out of memory. Choose a smaller size, or raise the bound (--max_pixels, "
                         "or max_pixels=) if your hardware really holds it")
    if down_factor > 1:
        gh, gw = height // multiple, width // multiple
        if gh % down_factor or gw % down_factor:
            step = multiple * down_factor
            raise ValueError(f"{height}x{width} pixels is a {gh}x{gw} token grid, not divisible by down_factor="
                             f"{down_factor}; with this variant choose sizes that are multiples of {step} pixels")


def check_sampling(steps: int | None = None, guidance: float | None = None, strength: float | None = None,
                   upscale_steps: int | None = None) -> None:
    """Steps (and upscale steps) are whole numbers >= 1 (``None``: the model's default), guidance is a
    finite number (``None``: the model's default), and with ``strength`` (SDEdit) 0 < strength <= 1
    leaves at least one denoising step."""
    for name, v in (("steps", steps), ("upscale_steps", upscale_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}={v!r}: the number of denoising steps must be a whole number >= 1 (leave it "
                             "out for the model's default)")
    if guidance is not None and not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
        raise ValueError(f"guidance={guidance!r} is not a finite number; pass e.g. 3.5 (or leave it out for the "
                         "model's default)")
    if strength is not None:
        if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
            raise ValueError(f"strength={strength!r} must be in (0, 1] (the noise level of each upscaling stage)")
        n = upscale_steps or steps
        if n is not None and int(n * strength) < 1:
            raise ValueError(f"strength={strength} with {n} steps leaves no denoising step; use steps >= "
                             f"{math.ceil(1 / strength)}")


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it (:func:`clear.devices.check_device`)."""
    from .devices import check_device as _check_device

    return _check_device(device)


def check_output_path(path: str | os.PathLike, suffix: str = ".png") -> Path:
    """An output file that can be written: it ends in ``suffix``, is not a folder, and its folder
    (or the nearest existing folder above it, in which it would be created) is a writable folder.
    Nothing is created."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise ValueError(f"--out {path} must end in {suffix}")
    if path.is_dir():
        raise ValueError(f"--out {path} is an existing folder; pass a file name inside it, "
                         f"e.g. {path / ('image' + suffix)}")
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, so no folder can be made there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: the folder {existing} is not writable (read-only or no permission); choose "
                         "another --out")
    return path


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"2048x4096,4096x8192"`` -> ``[(2048, 4096), (4096, 8192)]`` (HEIGHTxWIDTH)."""
    sizes = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            h, w = part.lower().split("x")
            sizes.append((int(h), int(w)))
        except ValueError:
            raise ValueError(f"{part!r} is not a size like 2048x4096 (HEIGHTxWIDTH in pixels)") from None
    if not sizes:
        raise ValueError(f"no sizes in {text!r}; write them like 2048x2048,4096x4096 (HEIGHTxWIDTH)")
    return sizes


def _looks_local(model: str) -> bool:
    """True for a --model that is meant as a folder, not a Hub id (``org/name``): it starts with
    ``.``, ``/`` or ``~``, has a backslash or more than one ``/``, or its parent folder exists."""
    m = str(model)
    return (m.startswith((".", "/", "~")) or os.path.isabs(m) or "\\" in m or m.count("/") > 1
            or ("/" in m and Path(m).parent.is_dir()))


def _no_such_folder(model: str) -> str:
    path = Path(model).expanduser().absolute()
    parent = next((p for p in path.parents if p.is_dir()), None)
    near = ""
    if parent is not None:
        names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        near = (f"; the nearest existing folder is {parent}" +
                (f", which holds: {', '.join(names[:10])}" + (" ..." if len(names) > 10 else "") if names else
                 " (no folders in it)"))
    return (f"--model {model}: no such folder ({path} does not exist{near}). Check the spelling, or pass a Hub id "
            f"such as {DEFAULT_MODEL}")


def check_model(model: str) -> dict:
    """Read the pipeline config (``model_index.json``: a small file, no weights) of a Hub id or
    local directory and fail unless it is a FLUX.1 or SD3/SD3.5 pipeline CLEAR inference
    supports (:data:`FAMILIES`). A path that does not exist fails as "no such folder" without
    asking the Hub; offline, only the local Hugging Face cache is read. Returns the config."""
    from diffusers import DiffusionPipeline

    model = str(model)
    is_dir = Path(model).expanduser().is_dir()
    if not is_dir and _looks_local(model):
        raise ValueError(_no_such_folder(model))
    offline = None if is_dir else hub_unreachable()
    try:
        config = DiffusionPipeline.load_config(str(Path(model).expanduser()) if is_dir else model,
                                               local_files_only=offline is not None)
    except Exception as e:
        if is_dir:
            where = "a local directory without model_index.json (not a diffusers pipeline saved with save_pretrained)"
        elif offline is not None:
            where = f"a Hub id that is not in the local Hugging Face cache, and the Hub is unreachable ({offline})"
        else:
            where = "not a Hub id this machine can read (gated, private or misspelled)"
        raise ValueError(f"could not read the pipeline config of {model!r}: it is {where} ({type(e).__name__}: {e}). "
                         "Pass --model a local diffusers pipeline directory (save_pretrained layout) or a Hub id "
                         f"such as {DEFAULT_MODEL} (gated: accept its license on the Hub, then `hf auth login`)") from e
    name = config.get("_class_name", "?")
    transformer = (config.get("transformer") or [None, None])[1]
    if not any(name in f.pipelines and transformer == f.transformer_class for f in FAMILIES.values()):
        supported = "; ".join(f"{', '.join(f.pipelines)} with a {f.transformer_class}" for f in FAMILIES.values())
        raise ValueError(f"{model!r} is a {name} (transformer: {transformer}); CLEAR inference supports FLUX.1 and "
                         f"SD3/SD3.5 pipelines ({supported}), e.g. "
                         f"{' or '.join(f.example for f in FAMILIES.values())}")
    return config


def pipeline_family(model_or_pipe) -> ModelFamily:
    """The :class:`clear.families.ModelFamily` of a pipeline object, or of a Hub id / local directory (from its
    ``model_index.json``, checked by :func:`check_model`)."""
    if hasattr(model_or_pipe, "transformer"):
        return family_of(model_or_pipe)
    return family_of(check_model(model_or_pipe))


def size_rules(model_or_pipe) -> tuple[int, int | None]:
    """(pixels per token side, most tokens per side or ``None``) of a pipeline, or of a Hub id /
    local directory read from its ``vae/`` and ``transformer/`` configs (no weights loaded).
    Pixels per token: the VAE factor times the patch size (FLUX packs 2x2 latents: 2; SD3: its
    ``patch_size``). Most tokens: SD3's ``pos_embed_max_size`` (its fixed table of positions:
    192 for SD3-Medium and SD3.5-Large = 3072 pixels, 384 for SD3.5-Medium = 6144 pixels);
    ``None`` for FLUX (RoPE has no table)."""
    family = pipeline_family(model_or_pipe)
    if hasattr(model_or_pipe, "transformer"):
        return family.grid_rules(int(model_or_pipe.vae_scale_factor), model_or_pipe.transformer.config)
    return family.size_rules(model_or_pipe)


def size_multiple(model_or_pipe) -> int:
    """Pixels per token side (see :func:`size_rules`)."""
    return size_rules(model_or_pipe)[0]


def checkpoint_variant(path: str | os.PathLike) -> tuple[float | None, int | None]:
    """(radius, down_factor) a CLEAR checkpoint was made for, from its header only: the
    metadata written by :func:`clear.save_clear_weights`, else the released file name,
    else the shape of ``spatial_weight``. ``None`` where the file does not say."""
    radius, down_factor, _ = file_variant(path)
    return radius, down_factor


def checkpoint_family(path: str | os.PathLike) -> str | None:
    """The model family (``"flux"``/``"sd3"``) a CLEAR checkpoint was made for, from its header:
    the metadata written by :func:`clear.save_clear_weights`, else FLUX's single-stream block
    keys (the released files); ``None`` where the file does not say."""
    return family_of_checkpoint(*read_header(path))


def check_checkpoint(path: str | os.PathLike, radius: float, down_factor: int = 1, family: str | None = None,
                     strict_radius: bool = True) -> None:
    """Fail if the checkpoint was made for another down factor than the chosen variant, or
    (``family`` given) for another model family, or holds non-float tensors; with
    ``strict_radius`` also if it was made for another radius or does not say its radius (no
    metadata, not a released file name: see :func:`clear.load_clear_weights`). Reads the header only."""
    file_family = checkpoint_family(path) if family is not None else None
    if file_family is not None and file_family != family:
        raise ValueError(f"{path} holds CLEAR weights for a {file_family} model, but the chosen model is a {family} "
                         f"model; pass a checkpoint trained for this model (scripts/distill.py) or --checkpoint none")
    file_r, file_df, known = file_variant(path)
    chosen = Variant(int(radius) if float(radius).is_integer() else radius, down_factor).name
    if file_df is not None and file_df != down_factor:
        raise ValueError(f"{path} is a checkpoint for down_factor={file_df} but the chosen variant is {chosen} "
                         f"(down_factor={down_factor}); pass --down_factor {file_df} (or the matching --variant), "
                         "or a checkpoint made for the chosen variant")
    if not strict_radius:
        return
    if not known:
        raise ValueError(f"{unverified_radius_message(path)} {chosen}: if it was trained for that variant, rename it "
                         f"{chosen}.safetensors (or save it with clear.save_clear_weights, which records the radius)")
    if file_r is not None and float(file_r) != float(radius):
        raise ValueError(f"{path} is a checkpoint for radius={file_r:g} but the chosen variant is {chosen} "
                         f"(radius={radius:g}); pass --radius {file_r:g} (or the matching --variant), "
                         "or a checkpoint made for the chosen variant")


def resolve_checkpoint(checkpoint: str | os.PathLike | None, radius: float, down_factor: int = 1,
                       local_dir: str | os.PathLike = "ckpt", family: str = "flux") -> str | None:
    """``"released"`` (or ``"auto"``): the released file for the variant (FLUX.1-dev weights;
    none exist for SD3), downloaded into ``local_dir`` on first use (offline: the error says
    where to put it); ``None``/``"none"``: no checkpoint (untrained CLEAR, e.g. for tests or a
    zero-shot look); a path: checked to match the variant and the model ``family``. Returns a
    path or ``None``."""
    if checkpoint is None or str(checkpoint).lower() == "none":
        return None
    if str(checkpoint).lower() in ("released", "auto", "default"):
        if not FAMILIES[family].released_weights:
            raise ValueError(f"no released CLEAR weights for {family} models (the released ones, Huage001/CLEAR, are "
                             "for FLUX.1-dev); train your own with scripts/distill.py and pass --checkpoint PATH, or "
                             "--checkpoint none for untrained CLEAR")
        name = Variant(int(radius), down_factor).name if float(radius).is_integer() else None
        if name not in RELEASED:
            raise ValueError(f"no released CLEAR weights for radius={radius:g}, down_factor={down_factor}; released: "
                             f"{', '.join(RELEASED)}. Pass --checkpoint PATH to your own weights or --checkpoint none")
        path = download_weights(int(radius), down_factor, local_dir=local_dir)
    else:
        path = str(checkpoint)
    check_checkpoint(path, radius, down_factor, family)
    return path


# ------------------------------------------------------------------------------------------
# Pipelines and CLEAR on them
# ------------------------------------------------------------------------------------------


def default_device() -> str:
    from .devices import default_device as _default_device

    return _default_device()


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` -> bfloat16 on CUDA, float32 elsewhere; names like ``"bf16"``/``"float16"`` accepted
    (:func:`clear.devices.resolve_dtype`)."""
    from .devices import resolve_dtype as _resolve_dtype

    return _resolve_dtype(dtype, device)


def load_pipeline(model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
                  offload: bool = False, check: bool = True):
    """The family's text-to-image pipeline (``FluxPipeline`` or ``StableDiffusion3Pipeline``)
    from a Hub id or local directory, on ``device`` in ``dtype`` (``offload``: model CPU
    offload instead of moving everything to the device). ``check=False`` skips
    :func:`check_model` (already done) and trusts the config's transformer class."""
    import diffusers

    device = str(check_device(device)) if device else default_device()  # before anything is read
    if check:
        family = pipeline_family(model)
    else:
        transformer = (diffusers.DiffusionPipeline.load_config(model).get("transformer") or [None, None])[1]
        family = next((f for f in FAMILIES.values() if f.transformer_class == transformer), FAMILIES["flux"])
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
                      controlnet_weights: bool = True, strict_radius: bool = True):
    """Put CLEAR on a FLUX or SD3 pipeline in one line: :func:`clear.apply_clear` on
    ``pipe.transformer`` and on each ControlNet, then load ``checkpoint`` (a path, e.g. from
    :func:`resolve_checkpoint`; ``None`` = untrained CLEAR) into the transformer and, unless
    ``controlnet_weights=False``, zero-shot into each ControlNet too (its blocks are copies of
    the transformer's first ones; it takes the blocks it has). Works for FLUX.1-schnell with
    the FLUX.1-dev weights. Loading a checkpoint overwrites the attention projections:
    generate with the original model first. ``strict_radius=False``: load a checkpoint that does
    not say its radius, or says another one (see :func:`clear.load_clear_weights`).
    Returns the transformer's :class:`clear.ClearAttention`."""
    if checkpoint is not None:
        if radius is None:
            raise ValueError("a CLEAR checkpoint needs a local window: pass the radius it was trained for")
        check_checkpoint(checkpoint, radius, down_factor, pipeline_family(pipe).name, strict_radius)
    models = clear_models(pipe)
    cores = [apply_clear(m, radius, down_factor, backend=backend, proportional_attention=proportional_attention)
             for m in models]
    if checkpoint is not None:
        for m in models if controlnet_weights else models[:1]:
            load_clear_weights(m, checkpoint, strict_radius=strict_radius)
    return cores[0]


def remove_from_pipeline(pipe) -> None:
    """Undo :func:`apply_to_pipeline`'s processors (loaded weights stay)."""
    for m in clear_models(pipe):
        if getattr(m, "clear_state", None) is not None:
            remove_clear(m)


@dataclass(frozen=True)
class ClearSpec:
    """What CLEAR to put on a pipeline: window, checkpoint path (``None`` = untrained), backend."""

    radius: float | None
    down_factor: int = 1
    checkpoint: str | None = None
    backend: str = "auto"

    def __post_init__(self):
        Window(self.radius, self.down_factor)  # radius > 0 (or None), down_factor >= 1: fails before any loading

    @property
    def label(self) -> str:
        if self.radius is None:
            return "original"
        return f"CLEAR r={self.radius:g}" + (f" df={self.down_factor}" if self.down_factor > 1 else "")

    def apply(self, pipe):
        return apply_to_pipeline(pipe, self.radius, self.down_factor, self.checkpoint, self.backend)


# ------------------------------------------------------------------------------------------
# Resolution extrapolation: NTK-scaled RoPE, proportional attention, fixed shift, VAE tiling
# ------------------------------------------------------------------------------------------


def ntk_rope(models, ntk_factor: float | None):
    """Within the block, the given model(s) (or a pipeline's transformer and ControlNets)
    use NTK-scaled RoPE (:func:`clear.families.flux.ntk_rope`); the original ``pos_embed``
    objects are put back afterwards. ``ntk_factor`` 1 or ``None``: nothing changes (any model)."""
    return _flux.ntk_rope(clear_models(models) if hasattr(models, "transformer") else models, ntk_factor)


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


def resolve_ntk_factor(family: ModelFamily | str, ntk_factor: float | None) -> float | None:
    """The NTK factor an upscaling stage uses: ``None`` = the family's default
    (:data:`DEFAULT_NTK_FACTOR` for FLUX; for SD3, which has no RoPE, nothing, with a logged
    note). An explicit factor other than 1 on SD3 is an error: it cannot be honoured."""
    return get_family(family).resolve_ntk_factor(ntk_factor)


def fixed_shift_scheduler(scheduler, shift: float):
    """A copy of the flow-matching scheduler with a fixed timestep shift ``shift`` instead of
    FLUX's resolution-dependent (dynamic) shift, which explodes far beyond the training size
    (SD3's schedulers already use a fixed shift, 3.0 as released)."""
    return type(scheduler).from_config(scheduler.config, use_dynamic_shifting=False, shift=float(shift))


@contextlib.contextmanager
def vae_tiling(vae, enabled: bool):
    old = getattr(vae, "use_tiling", False)
    try:
        vae.enable_tiling() if enabled else vae.disable_tiling()
        yield
    finally:
        vae.enable_tiling() if old else vae.disable_tiling()


def img2img_pipeline(pipe, scheduler=None):
    """diffusers' img2img pipeline of the family (``FluxImg2ImgPipeline``,
    ``StableDiffusion3Img2ImgPipeline``) sharing ``pipe``'s components (no copies, no dtype
    cast: unlike ``from_pipe``, which casts every shared module to its ``dtype`` argument)."""
    import diffusers

    cls = getattr(diffusers, pipeline_family(pipe).img2img_class)
    names = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in names}
    if scheduler is not None:
        components["scheduler"] = scheduler
    new = cls(**components)
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One generated image, how long the pipeline call took, and the settings that made it."""

    image: object  # PIL.Image
    seconds: float
    settings: dict = field(default_factory=dict)


def model_name(transformer) -> str:
    """Which released model a transformer's config is (the name of its :class:`clear.families.ModelSpec`)."""
    return family_of(transformer).spec(transformer.config).name


def default_settings(pipe) -> dict:
    """Steps, guidance and text length for the pipeline's model (its :class:`clear.families.ModelSpec`):
    FLUX.1-dev 28 / 3.5 / 512, FLUX.1-schnell 4 / 0 / 256, SD3-Medium 28 / 7 / 256,
    SD3.5-Medium 40 / 4.5 / 256, SD3.5-Large 28 / 3.5 / 256 (the mini model of ckpt/mini: 28 / 3.5 / 32)."""
    return family_of(pipe).spec(pipe.transformer.config).defaults()


def clear_label(pipe) -> str:
    state = getattr(pipe.transformer, "clear_state", None)
    if state is None or state.radius is None:
        return "original"
    return ClearSpec(state.radius, state.down_factor).label


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
    import numpy as np

    arr = np.asarray(images)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise NonFiniteImageError(f"the decoded image holds {bad} NaN/inf values of {arr.size}: it would be saved as "
                                  f"a black image, so no image is returned. {_NON_FINITE_HINT}")
    return pipe.numpy_to_pil(arr)[0]


def _timed_call(pipe, **kwargs) -> tuple[object, float]:
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


def _call_settings(pipe, height, width, steps, guidance, max_sequence_length, max_pixels=DEFAULT_MAX_PIXELS):
    """The model's defaults for what the caller left ``None``, the settings and the size checked
    for the pipeline as it is (CLEAR's down factor included), and its CLEAR state (or None)."""
    check_sampling(steps, guidance)
    d = default_settings(pipe)
    steps = d["steps"] if steps is None else steps
    guidance = d["guidance"] if guidance is None else guidance
    state = getattr(pipe.transformer, "clear_state", None)
    multiple, max_grid = size_rules(pipe)
    check_size(height, width, multiple, state.down_factor if state else 1, max_grid, max_pixels)
    return steps, guidance, max_sequence_length or d["max_sequence_length"], state


def generate(pipe, prompt: str, height: int, width: int, steps: int | None = None, guidance: float | None = None,
             seed: int = 0, max_sequence_length: int | None = None, warmup: bool = False,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, **pipe_kwargs) -> Result:
    """Text-to-image with the pipeline as it is (original or CLEAR). Seeded on the CPU, so
    the same seed gives the same starting noise on any device. ``warmup``: an untimed
    1-step call at the same size first (compilation, autotuning), for fair timings. Settings
    are checked first (:func:`check_sampling`, :func:`check_size` with ``max_pixels``); NaN or
    inf in the latents or the image raise :class:`NonFiniteImageError`."""
    steps, guidance, max_sequence_length, state = _call_settings(pipe, height, width, steps, guidance,
                                                                 max_sequence_length, max_pixels)
    kwargs = dict(prompt=prompt, height=height, width=width, guidance_scale=guidance,
                  max_sequence_length=max_sequence_length, **pipe_kwargs)
    if warmup:
        _timed_call(pipe, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    image, seconds = _timed_call(pipe, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                                 **kwargs)
    settings = dict(prompt=prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
                    max_sequence_length=max_sequence_length, attention=clear_label(pipe), seconds=round(seconds, 3))
    if state is not None:
        settings.update(radius=state.radius, down_factor=state.down_factor, backend=state.core.backend)
    return Result(image, seconds, settings)


def upscale(pipe, image, prompt: str, height: int, width: int, strength: float = DEFAULT_STRENGTH,
            steps: int | None = None, guidance: float | None = None, seed: int = 0,
            ntk_factor: float | None = None, proportional: bool | str = True, shift: float | None = DEFAULT_SHIFT,
            tiling: bool | None = None, max_sequence_length: int | None = None, warmup: bool = False,
            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Result:
    """One SDEdit stage: resize ``image`` to ``height x width`` (Lanczos), encode it, noise it
    to ``strength`` and denoise at the new size with the family's img2img pipeline on ``pipe``'s
    components (original or CLEAR, as the pipeline is). ``steps`` is the full schedule;
    ``int(steps * strength)`` of them run. ``ntk_factor`` (FLUX; ``None`` = 10, 1 = off; SD3
    has no RoPE: leave it ``None``), ``proportional`` attention, a fixed scheduler ``shift``
    (``None`` = the scheduler's own: FLUX's dynamic shift) and VAE ``tiling`` (``None``: on
    above 2048x2048 pixels) apply to this call only; ``proportional``: ``True`` (the release's
    scale, see :class:`clear.ClearAttention`), ``"plain"`` or ``False``. ``warmup``: an untimed
    1-step call at the same size first."""
    from PIL import Image

    steps, guidance, max_sequence_length, state = _call_settings(pipe, height, width, steps, guidance,
                                                                 max_sequence_length, max_pixels)
    ntk_factor = resolve_ntk_factor(pipeline_family(pipe), ntk_factor)
    check_sampling(steps, strength=strength)
    tiling = height * width > VAE_TILING_PIXELS if tiling is None else tiling
    scheduler = fixed_shift_scheduler(pipe.scheduler, shift) if shift is not None else None
    img2img = img2img_pipeline(pipe, scheduler)
    resized = image.convert("RGB").resize((width, height), Image.LANCZOS)
    with ntk_rope(pipe, ntk_factor), proportional_attention(pipe, proportional), vae_tiling(pipe.vae, tiling):
        kwargs = dict(image=resized, prompt=prompt, height=height, width=width, guidance_scale=guidance,
                      max_sequence_length=max_sequence_length)
        if warmup:
            _timed_call(img2img, strength=1.0, num_inference_steps=1,
                        generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
        out, seconds = _timed_call(img2img, strength=strength, num_inference_steps=steps,
                                   generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    settings = dict(prompt=prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
                    max_sequence_length=max_sequence_length, attention=clear_label(pipe), seconds=round(seconds, 3),
                    strength=strength, ntk_factor=ntk_factor, proportional_attention=proportional,
                    shift="dynamic" if shift is None else shift, vae_tiling=tiling,
                    source_size=f"{image.height}x{image.width}")
    if state is not None:
        settings.update(radius=state.radius, down_factor=state.down_factor, backend=state.core.backend)
    return Result(out, seconds, settings)


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
                     progress: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Stage]:
    """The paper's high-resolution recipe: a base image at ``base_size`` (HEIGHT, WIDTH), then
    one :func:`upscale` stage per entry of ``sizes`` (e.g. ``[(2048, 2048), (4096, 4096)]``,
    any aspect ratios). ``clear``: the CLEAR to put on the pipeline before the upscaling
    stages (and before the base stage if ``base_model="clear"``); ``None`` uses the pipeline
    as it is. ``base_image``: start from this image instead of generating one. All sizes are
    checked before anything runs (and ``ntk_factor``: see :func:`upscale`). ``warmup``: untimed
    1-step calls before each timed one. Returns the stages, base first."""
    from tqdm.auto import tqdm

    if base_model not in ("original", "clear"):
        raise ValueError(f"base_model must be 'original' or 'clear', got {base_model!r}")
    sizes = [tuple(map(int, s)) for s in sizes]
    multiple, max_grid = size_rules(pipe)
    state = getattr(pipe.transformer, "clear_state", None)
    df = clear.down_factor if clear is not None else (state.down_factor if state else 1)
    check_size(*base_size, multiple, df if (base_model == "clear" or clear is None) else 1, max_grid, max_pixels)
    for h, w in sizes:
        check_size(h, w, multiple, df, max_grid, max_pixels)
    ntk_factor = resolve_ntk_factor(pipeline_family(pipe), ntk_factor)
    check_sampling(steps, guidance)
    d = default_settings(pipe)
    upscale_steps = upscale_steps if upscale_steps is not None else (steps if steps is not None else d["steps"])
    check_sampling(upscale_steps=upscale_steps, strength=strength)

    stages = []
    with tqdm(total=len(sizes) + 1, desc="high-res stages", disable=not progress) as bar:
        if base_image is None:
            if clear is not None and base_model == "clear":
                clear.apply(pipe)
            base = generate(pipe, prompt, *base_size, steps=steps, guidance=guidance, seed=seed,
                            max_sequence_length=max_sequence_length, warmup=warmup, max_pixels=max_pixels)
        else:
            base = Result(base_image, 0.0, dict(source="given"))
        stages.append(Stage("base", base.image.height, base.image.width, base))
        bar.update()
        if clear is not None and (base_model == "original" or base_image is not None):
            clear.apply(pipe)
        image = base.image
        for h, w in sizes:
            bar.set_postfix_str(f"{h}x{w}")
            res = upscale(pipe, image, prompt, h, w, strength=strength, steps=upscale_steps, guidance=guidance,
                          seed=seed, ntk_factor=ntk_factor, proportional=proportional, shift=shift, tiling=tiling,
                          max_sequence_length=max_sequence_length, warmup=warmup, max_pixels=max_pixels)
            stages.append(Stage("upscale", h, w, res, source=image))
            image = res.image
            bar.update()
    return stages


# ------------------------------------------------------------------------------------------
# Outputs people look at: PNGs with their settings, side-by-side grids
# ------------------------------------------------------------------------------------------


def png_metadata(settings: dict):
    """PNG text chunks: one per setting (``clear:<name>``) and all of them as JSON (``clear:settings``)."""
    from PIL.PngImagePlugin import PngInfo

    from . import __version__

    info = PngInfo()
    info.add_text("Software", f"clear {__version__}")
    for k, v in settings.items():
        info.add_text(f"clear:{k}", str(v))
    info.add_text("clear:settings", json.dumps(settings, default=str, sort_keys=True))
    return info


def save_png(image, path: str | os.PathLike, settings: dict | None = None) -> str:
    """Write ``image`` as PNG atomically (:func:`clear.files.save_image`) with ``settings``
    in its text chunks; read them back with ``PIL.Image.open(path).text``."""
    from .files import save_image

    return str(save_image(image, path, "PNG", pnginfo=png_metadata(settings or {})))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def image_grid(images, labels=None, max_side: int = 2048, columns: int | None = None):
    """Images side by side (``columns`` per row; default all in one row), each under its label,
    scaled down so that no panel's long side exceeds ``max_side``."""
    from PIL import Image, ImageDraw

    images = [im.convert("RGB") for im in images]
    labels = list(labels) if labels is not None else [""] * len(images)
    panels = []
    for im in images:
        s = min(1.0, max_side / max(im.size))
        panels.append(im if s == 1.0 else im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                                                    Image.LANCZOS))
    columns = columns or len(panels)
    cell_w, cell_h = max(p.width for p in panels), max(p.height for p in panels)
    font_px = max(10, min(40, cell_w // 24))
    font = _font(font_px)
    label_h = font_px + 8 if any(labels) else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max([cell_w] + [int(measure.textlength(t, font=font)) + 6 for t in labels])  # labels fit
    rows = -(-len(panels) // columns)
    pad = 4
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (p, label) in enumerate(zip(panels, labels)):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + label_h + pad)
        if label:
            draw.text((x + 2, y + 2), label, fill="black", font=font)
        grid.paste(p, (x, y + label_h))
    return grid


def timing_label(result: Result, name: str, reference: Result | None = None) -> str:
    text = f"{name}: {result.seconds:.2f} s"
    if reference is not None and result.seconds > 0:
        text += f" ({reference.seconds / result.seconds:.2f}x)"
    return text
