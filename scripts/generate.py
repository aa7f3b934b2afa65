#!/usr/bin/env python
"""Text-to-image with a CLEAR-linearized FLUX.1 or SD3/SD3.5, optionally upscaled to high resolution.

    python scripts/generate.py --prompt "a small blue plane" --height 2048 --width 2048 --variant clear_local_16
    python scripts/generate.py --prompt "..." --radius 8 --down_factor 4 --compare          # + original, grid
    python scripts/generate.py --prompt "..." --upscale 2048x2048,4096x4096                # SDEdit high-res
    torchrun --nproc_per_node 8 scripts/generate.py --parallel patch --height 8192 --width 8192   # multi-GPU (FLUX)
    python scripts/generate.py --model stabilityai/stable-diffusion-3.5-large --radius 16 --checkpoint sd35.safetensors
    python scripts/generate.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --num_frames 81 --height 480 --width 832 \
        --radius 16 --temporal_radius 4 --checkpoint none --out fox.gif       # a clip (Wan; docs/inference.md)

Sizes are HEIGHTxWIDTH pixels, multiples of 16 (SD3: at most pos_embed_max_size x 16 per side,
3072 for SD3-Medium and SD3.5-Large, 6144 for SD3.5-Medium). Outputs are PNGs whose text chunks hold
the settings (``PIL.Image.open(path).text``). Everything checkable without weights
(sizes and --max_pixels, radius, steps, guidance, device, --out, model family and path,
checkpoint variant, family and dtypes, weights present) is checked before anything loads;
NaN / inf in the checkpoint fail when it loads, in the latents or image before any PNG is written.

The work is clear.commands.generate (shared with scripts/generate_highres.py): ``resolve_args``
(checks, no heavy work), ``build_pipeline`` (load and put CLEAR on it; the place where a
distributed wrapper plugs in) and ``run``; ``main(argv)`` calls them.
"""

from __future__ import annotations

import argparse
import sys

# clear.commands.generate imports clear.inference only when its functions run: --help stays fast
from clear.commands.generate import add_arguments, build_pipeline, resolve_args, run, run_patch_parallel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv=None, parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Run the CLI in-process; raises ValueError/FileNotFoundError on bad settings."""
    args = resolve_args((parser or build_parser()).parse_args(argv))
    if args.parallel == "patch":
        return run_patch_parallel(args)
    return run(args, build_pipeline(args))


def cli(parser: argparse.ArgumentParser | None = None) -> None:
    try:
        main(parser=parser)
    except (ValueError, FileNotFoundError, TypeError, NotImplementedError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
