#!/usr/bin/env python
"""High-resolution generation with CLEAR (SDEdit, the paper's recipe): a base image, then
progressive upscaling stages with FluxImg2ImgPipeline (or StableDiffusion3Img2ImgPipeline for
SD3/SD3.5 models) and CLEAR attention.

    python scripts/generate_highres.py --prompt "a small blue plane" --variant clear_local_16_down_4 \\
        --height 1024 --width 2048 --upscale 2048x4096,4096x8192

Same options as scripts/generate.py (see --help; both are clear.commands.generate); --upscale
defaults to 2048x2048,4096x4096 and --out to outputs/clear_highres.png.
"""

from __future__ import annotations

import argparse
import sys

from clear.commands.generate import add_arguments, build_pipeline, resolve_args, run, run_patch_parallel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(upscale="2048x2048,4096x4096", out="outputs/clear_highres.png")
    return parser


def main(argv=None) -> dict[str, str]:
    """Run the CLI in-process; raises ValueError/FileNotFoundError on bad settings."""
    args = resolve_args(build_parser().parse_args(argv))
    if args.parallel == "patch":
        return run_patch_parallel(args)
    return run(args, build_pipeline(args))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, TypeError) as e:
        sys.exit(f"error: {e}")
