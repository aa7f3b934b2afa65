"""CLEAR checkpoints: the released variants, download, save and load (safetensors).

A checkpoint holds, for every CLEAR attention module of the model, the projections
that distillation trains: ``<module>.to_q/to_k/to_v.{weight,bias}``, ``<module>.to_out.0.{weight,bias}``
where the module has an output projection (FLUX double-stream blocks; single-stream
blocks have none), and ``<module>.processor.spatial_weight`` for down-sampled variants.
Module names are diffusers' own, so files load into stock models.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .apply import clear_attention_modules

HUB_REPO = "Huage001/CLEAR"
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


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


def download_weights(radius: int, down_factor: int = 1, local_dir: str | os.PathLike = "ckpt",
                     repo_id: str = HUB_REPO) -> str:
    """Path to the released file for ``(radius, down_factor)``, fetched with
    ``huggingface_hub.hf_hub_download`` into ``local_dir`` unless already there."""
    variant = Variant(radius, down_factor)
    if repo_id == HUB_REPO and variant.name not in RELEASED:
        raise ValueError(f"no released CLEAR weights for {variant.name}; released: {', '.join(RELEASED)}")
    target = Path(local_dir) / variant.filename
    if target.is_file():
        return str(target)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo_id, filename=variant.filename, local_dir=str(local_dir))
    except Exception as e:  # offline, no such file, network error: the HF cache may still have it
        first = e
    try:
        return hf_hub_download(repo_id=repo_id, filename=variant.filename, local_files_only=True)
    except Exception:
        raise FileNotFoundError(
            f"could not get {variant.filename} from the Hub repo {repo_id} ({type(first).__name__}: {first}). "
            f"Download it by hand and put it at {target}"
        ) from first


def clear_state_dict_keys(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a CLEAR checkpoint holds (and distillation trains), by key."""
    params = {}
    for name, attn in clear_attention_modules(transformer).items():
        for proj in _PROJECTIONS:
            try:
                layer = attn.get_submodule(proj)
            except AttributeError:
                continue
            for p_name, p in layer.named_parameters(recurse=False):
                params[f"{name}.{proj}.{p_name}"] = p
        if attn.processor.spatial_weight is not None:
            params[f"{name}.processor.spatial_weight"] = attn.processor.spatial_weight
    return params


def _metadata(transformer) -> dict[str, str]:
    state = transformer.clear_state
    return {"format": "pt", "clear.radius": str(state.radius), "clear.down_factor": str(state.down_factor),
            "clear.family": state.family, "clear.model": type(transformer).__name__}


def save_clear_weights(transformer: torch.nn.Module, path: str | os.PathLike) -> str:
    """Write the CLEAR parameters of ``transformer`` in the released layout, atomically
    (a temporary file renamed into place), with the radius and family as metadata."""
    from safetensors.torch import save_file

    tensors = {k: p.detach().to("cpu").contiguous() for k, p in clear_state_dict_keys(transformer).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=_metadata(transformer))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(path)


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLEAR checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: delete it and "
            "download or save it again"
        ) from e


def _file_window(path, tensors, metadata) -> tuple[int | None, int | None]:
    """(radius, down_factor) the file was made for, from its metadata or released file name."""
    if "clear.radius" in metadata:
        r = metadata["clear.radius"]
        return (None if r == "None" else float(r)), int(metadata.get("clear.down_factor", 1))
    try:
        v = Variant.parse(str(path))
        return v.radius, v.down_factor
    except ValueError:
        pass
    sw = [t for k, t in tensors.items() if k.endswith("processor.spatial_weight")]
    return None, (sw[0].shape[3] if sw else 1)


def _describe(keys, n=5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _extra_block(key: str, model: torch.nn.Module) -> bool:
    """True for a key of a block index the model does not have (e.g. a transformer file
    loaded into a ControlNet, whose blocks are copies of the transformer's first ones)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", key)
    blocks = getattr(model, m.group(1), None) if m else None
    return blocks is not None and int(m.group(2)) >= len(blocks)


def load_clear_weights(transformer: torch.nn.Module, path: str | os.PathLike, strict_radius: bool = True,
                       ignore_extra_blocks: bool | None = None) -> None:
    """Load a CLEAR checkpoint (released or saved by :func:`save_clear_weights`) into a
    model to which :func:`clear.apply_clear` has been applied with the matching variant.
    Works with fused QKV projections. Fails, naming the keys and the likely cause, on a
    corrupt file, missing or unexpected keys, shape mismatches, or a file made for
    another radius / down-sampling factor / model family.

    ``ignore_extra_blocks``: skip keys of blocks the model does not have. Defaults to True
    for ControlNets, which reuse the transformer's file zero-shot (their blocks are copies
    of its first blocks), and False for everything else."""
    params = clear_state_dict_keys(transformer)
    state = transformer.clear_state
    tensors, metadata = _read(path)
    if ignore_extra_blocks is None:
        ignore_extra_blocks = "ControlNet" in type(transformer).__name__
    if ignore_extra_blocks:
        tensors = {k: t for k, t in tensors.items() if not _extra_block(k, transformer)}

    file_radius, file_df = _file_window(path, tensors, metadata)
    if "clear.family" in metadata and metadata["clear.family"] != state.family:
        raise ValueError(f"{path} holds CLEAR weights for a {metadata['clear.family']} model, not {state.family}")
    if file_df != state.down_factor:
        raise ValueError(
            f"{path} is for down_factor={file_df} but CLEAR was applied with down_factor={state.down_factor}; "
            f"call clear.apply_clear(transformer, radius=..., down_factor={file_df})"
        )
    if strict_radius and file_radius is not None and float(file_radius) != float(state.radius or -1):
        raise ValueError(
            f"{path} was trained for radius={file_radius:g} but CLEAR was applied with radius={state.radius}; "
            f"call clear.apply_clear(transformer, radius={file_radius:g}, ...) (or pass strict_radius=False to "
            "use the weights with another window on purpose)"
        )

    missing, unexpected = set(params) - set(tensors), set(tensors) - set(params)
    if missing or unexpected:
        hint = "the file is for another model (different number of blocks or module names)"
        if any(k.startswith("single_transformer_blocks") for k in tensors) != any(
            k.startswith("single_transformer_blocks") for k in params
        ):
            hint = "the file is for another model family (FLUX vs SD3)"
        raise ValueError(
            f"{path} does not match this model: "
            + (f"missing keys: {_describe(missing)}; " if missing else "")
            + (f"unexpected keys: {_describe(unexpected)}; " if unexpected else "")
            + f"likely cause: {hint}"
        )
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
           for k, p in params.items() if tensors[k].shape != p.shape]
    if bad:
        raise ValueError(f"{path} has tensors of the wrong shape for this model (another model width?): "
                         + "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))

    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
        for attn in clear_attention_modules(transformer).values():
            _refresh_fused(attn)


def _refresh_fused(attn) -> None:
    """After loading to_q/to_k/to_v, rebuild diffusers' fused ``to_qkv`` from them."""
    if not getattr(attn, "fused_projections", False) or not hasattr(attn, "to_qkv"):
        return
    attn.to_qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    if attn.to_qkv.bias is not None:
        attn.to_qkv.bias.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
