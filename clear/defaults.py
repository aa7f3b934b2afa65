"""Light constants of the command lines: the default model and the upscaling recipe's settings.

The released models themselves (recognised from a transformer's config, with the sampling
settings their publishers recommend, T5 length and training length) are the
:class:`clear.families.ModelSpec` entries of each family file (``clear/families/``)."""

from __future__ import annotations

# This module imports nothing heavy: scripts read these defaults to build their --help.
DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"

# What a --backend flag accepts: "auto" and every registered attention backend (clear.backends.choices(), which
# imports the backends themselves; tests/test_backends.py holds the two equal).
BACKEND_CHOICES = ("auto", "dense", "flex", "tiled")

# Settings of the released recipe for the upscaling stages.
DEFAULT_STRENGTH = 0.7
DEFAULT_NTK_FACTOR = 10.0  # FLUX; SD3 has no RoPE
DEFAULT_SHIFT = 3.0  # FLUX.1's and SD3's scheduler ``shift``; used fixed instead of resolution-dependent shifting

# Largest image (height x width pixels) generated unless the caller raises it: 16384², four times the
# largest size this project documents (8192², multi-GPU). FLUX's RoPE has no table to bound the size; far
# beyond this, one image's latents, activations and decoded pixels exceed any single GPU.
DEFAULT_MAX_PIXELS = 16384 * 16384

# VAE tiling (diffusers' ``vae.enable_tiling()``) is on, unless the caller says, from this many latent cells
# (height / f x width / f, f the pipeline's ``vae_scale_factor``): where the VAE's mid-block self-attention,
# quadratic in the latent cells, takes over the decode. FLUX's 8x VAE: from 2048² pixels; the mini teacher's
# 2x VAE: from 512² pixels.
VAE_TILING_LATENTS = 256 * 256
