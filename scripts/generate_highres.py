#!/usr/bin/env python
"""High-resolution generation with CLEAR (SDEdit, the paper's recipe): a base image, then
progressive upscaling stages with FluxImg2ImgPipeline (or StableDiffusion3Img2ImgPipeline for
SD3/SD3.5 models) and CLEAR attention.

    python scripts/generate_highres.py --prompt "a small blue plane" --variant clear_local_16_down_4 \\
        --height 1024 --width 2048 --upscale 2048x4096,4096x8192

Same options as scripts/generate.py (see --help); --upscale defaults to 2048x2048,4096x4096
and --out to outputs/clear_highres.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate  # noqa: E402


def build_parser():
    parser = generate.build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(upscale="2048x2048,4096x4096", out="outputs/clear_highres.png")
    return parser


def main(argv=None):
    return generate.main(argv, parser=build_parser())


if __name__ == "__main__":
    generate.cli(build_parser())
