"""Checks that run before any weights load: image sizes and their limits, sampling settings,
the device, the output path, the model (its ``model_index.json``: family and path) and the
CLEAR checkpoint (its header: variant, family, dtypes), each failing with a message that says
what to do instead.

The family facts of a model are read here and nowhere else in :mod:`clear.inference`:
:func:`pipeline_family` (which family), :func:`size_rules` (pixels per token, largest grid),
:func:`resolve_ntk_factor` (RoPE or not), :func:`checkpoint_family` (a checkpoint's family);
:func:`clear.inference.pipeline.model_spec` reads the released model's defaults.
Device and dtype: :mod:`clear.devices`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from .. import families
from ..families import ModelFamily, family_of, family_of_checkpoint, get_family
from ..families.base import check_size
from ..defaults import DEFAULT_MAX_PIXELS, DEFAULT_MODEL
from ..weights import (RELEASED, STRICT_RADIUS_OFF, Variant, download_weights, file_variant, hub_unreachable,
                       radius_text, read_header, same_radius, unverified_radius_message)

logger = logging.getLogger(__name__)

# Pipelines (model_index.json ``_class_name``) generate.py can load, and their transformers.
SUPPORTED_PIPELINES = tuple(p for f in families.FAMILIES.values() for p in f.pipelines)
SUPPORTED_TRANSFORMERS = tuple(f.transformer_class for f in families.FAMILIES.values())


# ------------------------------------------------------------------------------------------
# Settings: sizes, sampling, output path
# ------------------------------------------------------------------------------------------


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


UPSCALE_SYNTAX = ("stages are sizes HEIGHTxWIDTH in pixels, each taller or wider than the one before (e.g. "
                  "--upscale 2048x2048,4096x4096), or factors of the image before (e.g. --upscale 2x,2x)")


def parse_sizes(text: str, base: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """``"2048x4096,4096x8192"`` -> ``[(2048, 4096), (4096, 8192)]`` (HEIGHTxWIDTH); a bare ``N`` is ``NxN``.
    With ``base`` (the first image's HEIGHT, WIDTH), a factor ``2x`` (or ``x2``) is that many times
    the size before it: ``parse_sizes("2x,2x", base=(512, 768))`` -> ``[(1024, 1536), (2048, 3072)]``."""
    sizes = []
    for part in str(text).replace(" ", "").lower().split(","):
        if not part:
            continue
        factor = part[:-1] if part.endswith("x") else part[1:] if part.startswith("x") else None
        if factor is not None and base is None:
            raise ValueError(f"{part!r} is a factor: it needs the size of the first image (parse_sizes(..., base=))")
        try:
            if factor is not None:
                f = float(factor)
                if not (math.isfinite(f) and f > 0):
                    raise ValueError(f"factor {f}")
                h, w = sizes[-1] if sizes else base
                sizes.append((round(h * f), round(w * f)))
            else:
                h, w = part.split("x") if "x" in part else (part, part)
                sizes.append((int(h), int(w)))
        except ValueError:
            raise ValueError(f"{part!r} is not a size like 2048x4096 (HEIGHTxWIDTH in pixels) or 2048 (square)"
                             + (" or a factor like 2x" if base is not None else "")) from None
    if not sizes:
        raise ValueError(f"no sizes in {text!r}; write them like 2048x2048,4096x4096 (HEIGHTxWIDTH)")
    return sizes


def check_upscaling(base: tuple[int, int], sizes) -> None:
    """Each upscaling stage must be larger than the image before it, taller or wider (a bare
    ``--upscale 4`` is a 4x4-pixel stage, not a factor): fail naming the stage and the syntax."""
    before = tuple(base)
    for i, size in enumerate(sizes):
        h, w = size
        if h <= before[0] and w <= before[1]:
            raise ValueError(f"upscaling stage {i + 1}, {h}x{w} pixels, is no larger than the image before it "
                             f"({before[0]}x{before[1]}): {UPSCALE_SYNTAX}")
        before = (h, w)


# ------------------------------------------------------------------------------------------
# The model: path, family, size rules, NTK
# ------------------------------------------------------------------------------------------


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
    supports (:data:`clear.families.FAMILIES`). A path that does not exist fails as "no such folder" without
    asking the Hub; offline, only the local Hugging Face cache is read. Returns the config."""
    from diffusers import DiffusionPipeline  # here: every check answers before diffusers loads (seconds)

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
    if not any(name in f.pipelines and transformer == f.transformer_class for f in families.FAMILIES.values()):
        supported = "; ".join(f"{', '.join(f.pipelines)} with a {f.transformer_class}" for f in families.FAMILIES.values())
        raise ValueError(f"{model!r} is a {name} (transformer: {transformer}); CLEAR inference supports FLUX.1 and "
                         f"SD3/SD3.5 pipelines ({supported}), e.g. "
                         f"{' or '.join(f.example for f in families.FAMILIES.values())}")
    return config


def pipeline_family(model_or_pipe, check: bool = True) -> ModelFamily:
    """The :class:`clear.families.ModelFamily` of a pipeline object, or of a Hub id / local directory (from its
    ``model_index.json``, checked by :func:`check_model`; ``check=False``: read without the checks, trusting
    its transformer class)."""
    if hasattr(model_or_pipe, "transformer"):
        return family_of(model_or_pipe)
    if check:
        return family_of(check_model(model_or_pipe))
    from diffusers import DiffusionPipeline  # here: every check answers before diffusers loads (seconds)

    return family_of(DiffusionPipeline.load_config(model_or_pipe))


def size_rules(model_or_pipe, family: ModelFamily | None = None) -> tuple[int, int | None]:
    """(pixels per token side, most tokens per side or ``None``) of a pipeline, or of a Hub id /
    local directory read from its ``vae/`` and ``transformer/`` configs (no weights loaded).
    Pixels per token: the VAE factor times the patch size (FLUX packs 2x2 latents: 2; SD3: its
    ``patch_size``). Most tokens: SD3's ``pos_embed_max_size`` (its fixed table of positions:
    192 for SD3-Medium and SD3.5-Large = 3072 pixels, 384 for SD3.5-Medium = 6144 pixels);
    ``None`` for FLUX (RoPE has no table). ``family``: already known (:func:`pipeline_family`)."""
    family = family or pipeline_family(model_or_pipe)
    if hasattr(model_or_pipe, "transformer"):
        return family.grid_rules(int(model_or_pipe.vae_scale_factor), model_or_pipe.transformer.config)
    return family.size_rules(model_or_pipe)


def size_multiple(model_or_pipe) -> int:
    """Pixels per token side (see :func:`size_rules`)."""
    return size_rules(model_or_pipe)[0]

def resolve_ntk_factor(family: ModelFamily | str, ntk_factor: float | None) -> float | None:
    """The NTK factor an upscaling stage uses: ``None`` = the family's default
    (:data:`DEFAULT_NTK_FACTOR` for FLUX; for SD3, which has no RoPE, nothing, with a logged
    note). An explicit factor other than 1 on SD3 is an error: it cannot be honoured."""
    return get_family(family).resolve_ntk_factor(ntk_factor)


# ------------------------------------------------------------------------------------------
# The CLEAR checkpoint (header only)
# ------------------------------------------------------------------------------------------


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
                         f"{chosen}.safetensors (or save it with clear.save_clear_weights, which records the radius), "
                         f"or pass {STRICT_RADIUS_OFF} to load it anyway")
    if not same_radius(file_r, radius):
        fix = "a checkpoint made for a local window" if file_r is None else (
            f"--radius {file_r:g} (or the matching --variant), or a checkpoint made for the chosen variant")
        raise ValueError(f"{path} is a checkpoint for radius={radius_text(file_r)} but the chosen variant is {chosen} "
                         f"(radius={radius:g}); pass {fix} (or {STRICT_RADIUS_OFF} to use it with another window on "
                         "purpose)")


def resolve_checkpoint(checkpoint: str | os.PathLike | None, radius: float, down_factor: int = 1,
                       local_dir: str | os.PathLike = "ckpt", family: str = "flux",
                       strict_radius: bool = True, revision: str | None = None) -> str | None:
    """``"released"`` (or ``"auto"``): the released file for the variant (FLUX.1-dev weights;
    none exist for SD3), downloaded into ``local_dir`` on first use (offline: the error says
    where to put it); ``None``/``"none"``: no checkpoint (untrained CLEAR, e.g. for tests or a
    zero-shot look); a path: checked to match the variant and the model ``family`` (its radius only
    with ``strict_radius``: see :func:`check_checkpoint`). ``revision``: of the released files' Hub repo
    (default :data:`clear.weights.HUB_REVISION`). Returns a path or ``None``."""
    if checkpoint is None or str(checkpoint).lower() == "none":
        return None
    if str(checkpoint).lower() in ("released", "auto", "default"):
        if not get_family(family).released_weights:
            how = "scripts/distill.py"
            raise ValueError(f"no released CLEAR weights for {family} models (the released ones, Huage001/CLEAR, are "
                             f"for FLUX.1-dev); train your own with {how} and pass --checkpoint PATH, or "
                             "--checkpoint none for untrained CLEAR")
        name = Variant(int(radius), down_factor).name if float(radius).is_integer() else None
        if name not in RELEASED:
            raise ValueError(f"no released CLEAR weights for radius={radius:g}, down_factor={down_factor}; released: "
                             f"{', '.join(RELEASED)}. Pass --checkpoint PATH to your own weights or --checkpoint none")
        path = download_weights(int(radius), down_factor, local_dir=local_dir, revision=revision)
    else:
        path = str(checkpoint)
    check_checkpoint(path, radius, down_factor, family, strict_radius)
    return path
