"""The base models CLEAR knows, recognised from a transformer's config, and the sampling
settings their publishers recommend (diffusers docs / model cards). One table, read by
inference (steps, guidance, text length) and by training (guidance of generated and
validation images)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

# This module imports nothing heavy: scripts read these defaults to build their --help.
DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"

# Settings of the released recipe for the upscaling stages.
DEFAULT_STRENGTH = 0.7
DEFAULT_NTK_FACTOR = 10.0  # FLUX; SD3 has no RoPE
DEFAULT_SHIFT = 3.0  # FLUX.1's and SD3's scheduler ``shift``; used fixed instead of resolution-dependent shifting

# Largest image (height x width pixels) generated unless the caller raises it: 16384², four times the
# largest size this project documents (8192², multi-GPU). FLUX's RoPE has no table to bound the size; far
# beyond this, one image's latents, activations and decoded pixels exceed any single GPU.
DEFAULT_MAX_PIXELS = 16384 * 16384


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling settings a released model is meant to be run with."""

    steps: int
    guidance: float
    max_sequence_length: int  # T5 tokens


# SD3.5-Large-Turbo has SD3.5-Large's config: pass steps=4, guidance=0 for it.
MODEL_DEFAULTS = {
    "FLUX.1-dev": ModelDefaults(28, 3.5, 512),
    "FLUX.1-schnell": ModelDefaults(4, 0.0, 256),
    "SD3-Medium": ModelDefaults(28, 7.0, 256),
    "SD3.5-Medium": ModelDefaults(40, 4.5, 256),
    "SD3.5-Large": ModelDefaults(28, 3.5, 256),
}


def model_name(family: str, config: Mapping) -> str:
    """Which released model a transformer config of ``family`` ("flux" or "sd3") is: FLUX.1-dev
    (guidance embedding) or -schnell; SD3.5-Medium (``dual_attention_layers``), SD3.5-Large
    (QK norm) or SD3-Medium."""
    if family == "flux":
        return "FLUX.1-dev" if config.get("guidance_embeds") else "FLUX.1-schnell"
    if config.get("dual_attention_layers"):
        return "SD3.5-Medium"
    return "SD3.5-Large" if config.get("qk_norm") else "SD3-Medium"


def model_defaults(family: str, config: Mapping) -> ModelDefaults:
    return MODEL_DEFAULTS[model_name(family, config)]
