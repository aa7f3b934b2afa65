"""CLEAR: convolution-like local attention for pretrained diffusion transformers.

    import clear
    clear.apply_clear(pipe.transformer, radius=16)
    clear.load_clear_weights(pipe.transformer, clear.download_weights(radius=16))
"""

from .apply import apply_clear, clear_attention_modules, model_family, remove_clear
from .attention import ClearAttention
from .geometry import TokenLayout, Window, attention_flops, count_allowed_pairs
from .parallel import parallelize, patch_parallel_pipeline_call, unparallelize
from .weights import (
    RELEASED,
    Variant,
    clear_state_dict_keys,
    download_weights,
    load_clear_weights,
    save_clear_weights,
)

__version__ = "0.1.0"

__all__ = [
    "apply_clear",
    "remove_clear",
    "load_clear_weights",
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
