"""CLEAR checkpoints: the released variants, download, save and load (safetensors).

A checkpoint holds, for every CLEAR attention module of the model, the projections
that distillation trains: ``<module>.to_q/to_k/to_v.{weight,bias}``, ``<module>.to_out.0.{weight,bias}``
where the module has an output projection (FLUX double-stream blocks; single-stream
blocks have none), and ``<module>.processor.spatial_weight`` for down-sampled variants.
Module names are diffusers' own, so files load into stock models.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open

from .apply import clear_attention_modules
from .families import family_of_checkpoint
from .files import save_safetensors

logger = logging.getLogger(__name__)

HUB_REPO = "Huage001/CLEAR"
# The revision of HUB_REPO that download_weights fetches (a branch, tag or commit sha), named in every Hub call so
# that what is downloaded is chosen here, not by whatever the repo's default branch holds that day. Override it with
# download_weights(revision=...) or the generate scripts' --weights_revision. To pin the files byte for byte, set it
# to a commit sha (huggingface_hub.model_info(HUB_REPO).sha on a machine with network access).
HUB_REVISION = "main"
# FLUX.2's single-stream blocks fuse q, k, v with the MLP input (to_qkv_mlp_proj) and attention with the MLP output
# (to_out, a Linear there; a ModuleList, without parameters of its own, everywhere else)
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "to_out")


@dataclass(frozen=True)
class Variant:
    """A named CLEAR configuration, e.g. ``clear_local_16_down_4``."""

    radius: int
    down_factor: int = 1

    @property
    def name(self) -> str:
        return f"clear_local_{self.radius}" + (f"_down_{self.down_factor}" if self.down_factor > 1 else "")

    @property
    def filename(self) -> str:
        return self.name + ".safetensors"

    @classmethod
    def parse(cls, name: str) -> "Variant":
        m = re.fullmatch(r"clear_local_(\d+)(?:_down_(\d+))?(?:\.safetensors)?", Path(name).name)
        if not m:
            raise ValueError(f"{name!r} is not a CLEAR variant name like 'clear_local_16' or 'clear_local_8_down_4'")
        return cls(int(m.group(1)), int(m.group(2) or 1))


# The variants released for FLUX.1-dev on the Hub repo Huage001/CLEAR.
RELEASED = {v.name: v for v in (Variant(8), Variant(16), Variant(32), Variant(8, 4), Variant(16, 4))}


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (``HF_HUB_OFFLINE`` is set, or its host
    name does not resolve), or ``None``. Asked once before a download, so that an offline
    machine goes straight to the local cache instead of through the hub's retries (five
    "Retrying in Ns" lines and ~25 s)."""
    from huggingface_hub import constants  # here: huggingface_hub loads after --help

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot resolve {host}: {e}"
    return None


def _remove_new_dirs(created: list[Path]) -> None:
    """Undo what a failed ``hf_hub_download(local_dir=...)`` left: the ``.cache/huggingface``
    folder it makes in ``local_dir``, and the folders themselves where they did not exist before."""
    for path in reversed(created):  # deepest first
        if path.name == "huggingface":
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def download_weights(radius: int, down_factor: int = 1, local_dir: str | os.PathLike = "ckpt",
                     repo_id: str = HUB_REPO, revision: str | None = None) -> str:
    """Path to the released file for ``(radius, down_factor)``, fetched with
    ``huggingface_hub.hf_hub_download`` at ``revision`` (default :data:`HUB_REVISION`) into ``local_dir``
    unless already there. Offline (or after a failed download) the Hugging Face cache is tried at the same
    revision; a failed download leaves nothing behind in ``local_dir``."""
    revision = revision or HUB_REVISION
    variant = Variant(radius, down_factor)
    if repo_id == HUB_REPO and variant.name not in RELEASED:
        raise ValueError(f"no released CLEAR weights for {variant.name}; released: {', '.join(RELEASED)}")
    target = Path(local_dir) / variant.filename
    if target.is_file():
        return str(target)
    from huggingface_hub import hf_hub_download  # here: huggingface_hub loads after --help

    reason = hub_unreachable()
    if reason is None:
        local = Path(local_dir)
        created = [p for p in (local, local / ".cache", local / ".cache" / "huggingface") if not p.exists()]
        try:
            return hf_hub_download(repo_id=repo_id, filename=variant.filename, local_dir=str(local_dir),
                                   revision=revision)
        except Exception as e:  # no such file, gated, network error: the HF cache may still have it
            _remove_new_dirs(created)
            reason = f"{type(e).__name__}: {e}"
    try:
        return hf_hub_download(repo_id=repo_id, filename=variant.filename, local_files_only=True, revision=revision)
    except Exception as e:
        raise FileNotFoundError(
            f"could not get {variant.filename} from the Hub repo {repo_id} at revision {revision} ({reason}), and it "
            f"is not in the local Hugging Face cache. Download it by hand and put it at {target} (for a gated or "
            "private repo, `hf auth login` first)"
        ) from e


def _base_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """The projection itself: under a PEFT (LoRA) adapter, the wrapped ``base_layer``."""
    return getattr(layer, "base_layer", layer)


def _projections(transformer):
    """(module name, projection name, projection layer) of every CLEAR attention module."""
    for name, attn in clear_attention_modules(transformer).items():
        for proj in _PROJECTIONS:
            try:
                yield name, proj, attn.get_submodule(proj)
            except AttributeError:
                continue


def clear_state_dict_keys(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a CLEAR checkpoint holds (and distillation trains), by key. Under a
    PEFT adapter (LoRA on ``to_q/to_k/to_v/to_out.0``) these are the base projections'
    (``...to_q.base_layer.weight`` in the model, ``...to_q.weight`` in the file); the
    adapter's own weights are not part of a CLEAR checkpoint."""
    params = {}
    for name, proj, layer in _projections(transformer):
        for p_name, p in _base_layer(layer).named_parameters(recurse=False):
            params[f"{name}.{proj}.{p_name}"] = p
    for name, attn in clear_attention_modules(transformer).items():
        if attn.processor.spatial_weight is not None:
            params[f"{name}.processor.spatial_weight"] = attn.processor.spatial_weight
    quantized = sorted(k for k, p in params.items() if type(p) not in (torch.nn.Parameter, torch.Tensor))
    if quantized:
        raise TypeError(
            f"the attention projections of this model are quantized ({_describe(quantized, 2)} are "
            f"{type(params[quantized[0]]).__name__}): CLEAR checkpoints hold, and distillation trains, float "
            "projections. CLEAR attention itself runs on the quantized model; to use CLEAR weights, load them into "
            "the float model (apply_clear, load_clear_weights) and quantize it afterwards")
    return params


def _check_not_fused(transformer, action: str) -> None:
    """Refuse to read or write base projections into which a LoRA has been merged (``fuse_lora``)."""
    fused = sorted(f"{name}.{proj}" for name, proj, layer in _projections(transformer)
                   if getattr(layer, "merged_adapters", None))
    if fused:
        raise ValueError(
            f"cannot {action} CLEAR weights: a LoRA is fused into the attention projections ({_describe(fused, 3)}), "
            "so they hold base + LoRA weights mixed. Load CLEAR first and fuse the LoRA afterwards, or call "
            "unfuse_lora() (pipeline) / unmerge_adapter() (PEFT) first and fuse again after")


def _metadata(transformer) -> dict[str, str]:
    state = transformer.clear_state
    meta = {"format": "pt", "clear.radius": str(state.radius), "clear.down_factor": str(state.down_factor),
            "clear.family": state.family.name, "clear.model": type(transformer).__name__}
    if state.family.video:
        meta["clear.temporal_radius"] = str(state.temporal_radius)  # "None": every frame
    return meta


def save_clear_weights(transformer: torch.nn.Module, path: str | os.PathLike) -> str:
    """Write the CLEAR parameters of ``transformer`` in the released layout, atomically
    (a temporary file renamed into place), with the radius and family as metadata."""
    _check_not_fused(transformer, "save")
    tensors = {k: p.detach().to("cpu").contiguous() for k, p in clear_state_dict_keys(transformer).items()}
    if not tensors:
        raise ValueError(f"nothing to save to {path}: the model has no CLEAR attention projections (is CLEAR "
                         "applied to this model, with the projections as Linear layers?)")
    return str(save_safetensors(tensors, path, metadata=_metadata(transformer)))


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata): the header checked first (:func:`read_header`), then every tensor read."""
    metadata, _ = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as e:
        raise _unreadable(path, e) from e


def _unreadable(path, error) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt: delete "
                      "it and download or save it again")


def _file_window(path, metadata, spatial_shapes) -> tuple[float | None, int, bool]:
    """(radius, down_factor, radius_known) the file was made for: from its metadata (written by
    :func:`save_clear_weights`), else from a released file name; else the radius is unknown and the
    down factor is read from the shape of ``spatial_weight`` (1 without it). ``radius`` is ``None``
    for full attention (metadata ``"None"``) or when unknown."""
    if "clear.radius" in metadata:
        r = metadata["clear.radius"]
        try:
            radius = None if r == "None" else float(r)
            down_factor = int(metadata.get("clear.down_factor", 1))
        except ValueError:
            raise ValueError(f"{path}: its clear.radius metadata {r!r} is not a number (or clear.down_factor "
                             f"{metadata.get('clear.down_factor')!r} not a whole number): the file was not written by "
                             "clear.save_clear_weights; save it again with it") from None
        return radius, down_factor, True
    try:
        v = Variant.parse(str(path))
        return float(v.radius), v.down_factor, True
    except ValueError:
        pass
    return None, (int(spatial_shapes[0][3]) if spatial_shapes else 1), False


def same_radius(a: float | None, b: float | None) -> bool:
    """Whether two radii are the same window (``None``, full attention, only equals ``None``)."""
    return (a is None and b is None) or (a is not None and b is not None and float(a) == float(b))


def radius_text(radius: float | None) -> str:
    return "None (full attention)" if radius is None else f"{float(radius):g}"


def file_variant(path: str | os.PathLike) -> tuple[float | None, int, bool]:
    """(radius, down_factor, radius_known) of a CLEAR checkpoint from its header only (no tensors read)."""
    metadata, shapes = read_header(path)
    return _file_window(path, metadata, [s for k, s in shapes.items() if k.endswith("processor.spatial_weight")])


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """(metadata, {key: shape}) of a safetensors file, without reading its tensors; fails on
    tensors that are not floating point (see :func:`check_tensors`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLEAR checkpoint {path} does not exist; pass an existing .safetensors file, "
                                "'released' to download the released weights, or 'none' for untrained CLEAR")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, shapes = dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:
        raise _unreadable(path, e) from e
    _check_float(path, {k: _dtype_name(d) for k, d in dtypes.items() if not d.upper().startswith(("F", "BF"))})
    return metadata, shapes


# how a caller vouches for the window of a file that does not say (or says another) radius
STRICT_RADIUS_OFF = "strict_radius=False (on the command line: --no_strict_radius)"


def unverified_radius_message(path) -> str:
    return (f"{path} does not say which radius it was trained for (no clear.radius metadata, and its name is not "
            "a released variant name like clear_local_16.safetensors), so it cannot be checked against the "
            "chosen window")


def _dtype_name(code: str) -> str:
    """safetensors' dtype code as torch names it: I8 -> int8, U8 -> uint8, BOOL -> bool."""
    code = code.upper()
    return "bool" if code == "BOOL" else re.sub(r"^U", "uint", re.sub(r"^I", "int", code)).lower()


def _check_float(path, not_float: dict[str, str]) -> None:
    if not_float:
        listed = ", ".join(f"{k} ({d})" for k, d in sorted(not_float.items())[:5])
        raise ValueError(f"{path} holds non-float tensors, which CLEAR weights never are: {listed}"
                         + (f" and {len(not_float) - 5} more" if len(not_float) > 5 else "")
                         + "; it is not a CLEAR checkpoint (or a quantized one): use the float file")


def check_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that are not floating point (int8, int32, bool: they would be cast without a word)
    or that hold NaN / inf, naming the keys."""
    _check_float(path, {k: str(t.dtype).replace("torch.", "") for k, t in tensors.items()
                        if not t.is_floating_point()})
    bad = sorted(k for k, t in tensors.items() if not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"{path} holds NaN or inf values in {_describe(bad)}: the weights are broken (e.g. a "
                         "distillation that diverged); use an earlier checkpoint")


def _describe(keys, n=5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _extra_block(key: str, model: torch.nn.Module, block_lists: tuple[str, ...]) -> bool:
    """True for a key of a block index the model does not have (e.g. a transformer file
    loaded into a ControlNet, whose blocks are copies of the transformer's first ones);
    ``block_lists``: the model family's (``transformer_blocks``, ...)."""
    name, _, rest = key.partition(".")
    index = rest.split(".", 1)[0]
    blocks = getattr(model, name, None) if name in block_lists and index.isdigit() else None
    return blocks is not None and int(index) >= len(blocks)


def check_clear_weights(transformer: torch.nn.Module, path: str | os.PathLike, strict_radius: bool = True,
                        ignore_extra_blocks: bool | None = None) -> None:
    """Every check of :func:`load_clear_weights` that the file's header answers (variant, family, keys,
    shapes, dtypes), without reading a tensor or changing the model: for a run that generates with the
    original model before it loads CLEAR's weights (``--compare``, an original base image), so a file
    that does not fit fails before anything is generated. ``transformer``: with CLEAR applied."""
    _check_fits(transformer, path, strict_radius, ignore_extra_blocks)


def _check_fits(transformer, path, strict_radius: bool, ignore_extra_blocks: bool | None) -> tuple[dict, list]:
    """The model first (CLEAR applied, nothing fused), then the file's header against its CLEAR parameters: the
    window, family, keys and shapes (see :func:`load_clear_weights`). Returns the parameters and the keys to load."""
    params = clear_state_dict_keys(transformer)
    _check_not_fused(transformer, "load")
    state = transformer.clear_state
    metadata, shapes = read_header(path)
    if ignore_extra_blocks is None:
        ignore_extra_blocks = "ControlNet" in type(transformer).__name__
    if ignore_extra_blocks:
        shapes = {k: s for k, s in shapes.items() if not _extra_block(k, transformer, state.family.block_lists)}

    file_radius, file_df, radius_known = _file_window(
        path, metadata, [s for k, s in shapes.items() if k.endswith("processor.spatial_weight")])
    if "clear.family" in metadata and metadata["clear.family"] != state.family.name:
        raise ValueError(f"{path} holds CLEAR weights for a {metadata['clear.family']} model, not {state.family.name}")
    if file_df != state.down_factor:
        raise ValueError(
            f"{path} is for down_factor={file_df} but CLEAR was applied with down_factor={state.down_factor}; "
            f"call clear.apply_clear(transformer, radius=..., down_factor={file_df})"
        )
    if strict_radius and radius_known and not same_radius(file_radius, state.radius):
        raise ValueError(
            f"{path} was trained for radius={radius_text(file_radius)} but CLEAR was applied with "
            f"radius={state.radius}; call clear.apply_clear(transformer, radius={file_radius}, ...) (or pass "
            f"{STRICT_RADIUS_OFF} to use the weights with another window on purpose)"
        )
    if not radius_known:
        if strict_radius:
            r = state.radius
            name = Variant(int(r), state.down_factor).filename if r is not None and float(r).is_integer() else None
            raise ValueError(unverified_radius_message(path) + f" (radius={r}): "
                             + (f"if it was trained for that radius, rename it {name}, " if name else "")
                             + f"or pass {STRICT_RADIUS_OFF} to load it anyway")
        logger.warning("%s; loading it into CLEAR radius=%s because strict_radius=False",
                       unverified_radius_message(path), state.radius)
    elif not strict_radius and not same_radius(file_radius, state.radius):
        logger.warning("%s was trained for radius=%s; loading it into CLEAR radius=%s because strict_radius=False",
                       path, file_radius, state.radius)
    if strict_radius and state.family.video:
        _check_temporal_radius(path, metadata, state.temporal_radius)

    missing, unexpected = set(params) - set(shapes), set(shapes) - set(params)
    if missing or unexpected:
        hint = "the file is for another model (different number of blocks or module names)"
        if family_of_checkpoint({}, shapes) != family_of_checkpoint({}, params):  # by the block names they use
            hint = "the file is for another model family (FLUX vs SD3)"
        raise ValueError(
            f"{path} does not match this model: "
            + (f"missing keys: {_describe(missing)}; " if missing else "")
            + (f"unexpected keys: {_describe(unexpected)}; " if unexpected else "")
            + f"likely cause: {hint}"
        )
    bad = [f"{k}: file {tuple(shapes[k])} vs model {tuple(p.shape)}"
           for k, p in params.items() if tuple(shapes[k]) != tuple(p.shape)]
    if bad:
        raise ValueError(f"{path} has tensors of the wrong shape for this model (another model width?): "
                         + "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return params, list(params)


def load_clear_weights(transformer: torch.nn.Module, path: str | os.PathLike, strict_radius: bool = True,
                       ignore_extra_blocks: bool | None = None) -> None:
    """Load a CLEAR checkpoint (released or saved by :func:`save_clear_weights`) into a
    model to which :func:`clear.apply_clear` has been applied with the matching variant.
    Works with fused QKV projections. Fails, naming the keys and the likely cause, on a
    corrupt file, missing or unexpected keys, shape mismatches, or a file made for
    another radius / down-sampling factor / model family, non-float tensors (int8, int32,
    bool) or NaN / inf values.

    ``strict_radius``: the file's radius (metadata, or a released file name) must be the one
    CLEAR was applied with. A file that does not say its radius (no metadata, another name)
    is refused too; ``strict_radius=False`` loads it anyway (and a file of another radius),
    with a logged warning: the caller vouches for the window.

    Under a PEFT adapter (LoRA) the weights go into the base projections (``base_layer``) and
    the LoRA stays on top; after ``fuse_lora`` loading is refused (load CLEAR first).

    ``ignore_extra_blocks``: skip keys of blocks the model does not have. Defaults to True
    for ControlNets, which reuse the transformer's file zero-shot (their blocks are copies
    of its first blocks), and False for everything else."""
    params, keys = _check_fits(transformer, path, strict_radius, ignore_extra_blocks)
    tensors, _ = _read(path)
    tensors = {k: tensors[k] for k in keys}
    check_tensors(path, tensors)

    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
        for attn in clear_attention_modules(transformer).values():
            _refresh_fused(attn)


def _check_temporal_radius(path, metadata, temporal_radius) -> None:
    """A video checkpoint must say its temporal radius (``clear.temporal_radius``) and match the applied one."""
    if "clear.temporal_radius" not in metadata:
        raise ValueError(f"{path} does not say which temporal radius it was trained for (no clear.temporal_radius "
                         f"metadata), so it cannot be checked against temporal_radius={temporal_radius}: pass "
                         f"{STRICT_RADIUS_OFF} to load it anyway")
    written = metadata["clear.temporal_radius"]
    file_rt = None if written == "None" else float(written)
    if file_rt != (None if temporal_radius is None else float(temporal_radius)):
        said = "every frame (None)" if file_rt is None else f"{file_rt:g}"
        raise ValueError(f"{path} was trained for temporal_radius={said} but CLEAR was applied with temporal_radius="
                         f"{temporal_radius}; call clear.apply_clear(transformer, radius=..., temporal_radius="
                         f"{file_rt if file_rt is None else f'{file_rt:g}'}) (or pass {STRICT_RADIUS_OFF} to use the "
                         "weights with another window on purpose)")


def _refresh_fused(attn) -> None:
    """After loading to_q/to_k/to_v, rebuild diffusers' fused ``to_qkv`` from them."""
    if not getattr(attn, "fused_projections", False) or not hasattr(attn, "to_qkv"):
        return
    attn.to_qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    if attn.to_qkv.bias is not None:
        attn.to_qkv.bias.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
