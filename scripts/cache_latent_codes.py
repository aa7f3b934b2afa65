"""Cache the VAE posterior (latent mean and std) of every training image.

    torchrun --nproc_per_node=4 scripts/cache_latent_codes.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --data_root data/flux_dev_1024 --resolution 1024

Images are resized (shorter side) and centre-cropped to --resolution, as in training.
Writes <cache_dir>/latent_codes/<sample id>.safetensors ("latent_mean", "latent_std",
[16, res/8, res/8] for FLUX and SD3 / SD3.5: the VAE's [C, h, w] layout, unpacked; the
VAE's shift and scale are applied in training; FLUX.2: Flux2Pipeline's patchified,
batch-normalised latents [128, res/16, res/16] with std 0; Qwen-Image: the posterior
normalised with the VAE's latents_mean / latents_std, [16, res/8, res/8]); cache_dir defaults to <data_root>_cache;
the model family is recorded in each file's metadata. Training samples
z = mean + std * eps afresh every step. Rank r of W (torchrun) takes every W-th sample;
files already there are skipped, so a killed job resumes; each file is written atomically.
An image that does not decode is skipped, counted and listed at the end. Then train with
--use_cached_latent (and the same --resolution).
"""

from __future__ import annotations

import argparse

from clear.commands import cache
from clear.data import LATENT_CODES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache.add_arguments(parser, batch_size=8)
    parser.add_argument("--resolution", type=int, default=1024)
    return parser.parse_args(argv)


def main(argv=None):
    return cache.run(LATENT_CODES, **vars(parse_args(argv)))


if __name__ == "__main__":
    main()
