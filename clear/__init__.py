"""CLEAR: convolution-like local attention for pretrained diffusion transformers.

    import clear
    clear.apply_clear(pipe.transformer, radius=16)
    clear.load_clear_weights(pipe.transformer, clear.download_weights(radius=16))

The names below are imported on first use (PEP 562), so that ``import clear.defaults`` (the
defaults a command line's ``--help`` shows) does not import torch or diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "apply_clear": "apply",
    "remove_clear": "apply",
    "clear_attention_modules": "apply",
    "model_family": "apply",
    "ClearAttention": "attention",
    "TokenLayout": "geometry",
    "Window": "geometry",
    "attention_flops": "geometry",
    "count_allowed_pairs": "geometry",
    "parallelize": "parallel",
    "unparallelize": "parallel",
    "patch_parallel_pipeline_call": "parallel",
    "RELEASED": "weights",
    "Variant": "weights",
    "clear_state_dict_keys": "weights",
    "download_weights": "weights",
    "load_clear_weights": "weights",
    "check_clear_weights": "weights",
    "save_clear_weights": "weights",
}

__all__ = [
    "apply_clear",
    "remove_clear",
    "load_clear_weights",
    "check_clear_weights",
    "save_clear_weights",
    "download_weights",
    "attention_flops",
    "count_allowed_pairs",
    "clear_attention_modules",
    "parallelize",
    "unparallelize",
    "patch_parallel_pipeline_call",
    "clear_state_dict_keys",
    "model_family",
    "ClearAttention",
    "TokenLayout",
    "Window",
    "Variant",
    "RELEASED",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    try:  # a submodule: clear.inference, clear.visualize, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
