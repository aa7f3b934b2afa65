"""Cache the VAE posterior (latent mean and std) of every training image.

    torchrun --nproc_per_node=4 scripts/cache_latent_codes.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --data_root data/flux_dev_1024 --resolution 1024

Images are resized (shorter side) and centre-cropped to --resolution, as in training.
Writes <cache_dir>/latent_codes/<sample id>.safetensors ("latent_mean", "latent_std",
[16, res/8, res/8] for FLUX and SD3 / SD3.5: the VAE's [C, h, w] layout, unpacked; the
VAE's shift and scale are applied in training); cache_dir defaults to <data_root>_cache;
the model family is recorded in each file's metadata. Training samples
z = mean + std * eps afresh every step. Rank r of W (torchrun) takes every W-th sample;
files already there are skipped, so a killed job resumes; each file is written atomically.
An image that does not decode is skipped, counted and listed at the end. Then train with
--use_cached_latent (and the same --resolution).
"""

from __future__ import annotations

import argparse
import functools

import torch

from clear.data import LATENT_CODES, default_cache_dir, read_image, write_feature_cache
from clear.features import FAMILIES, LatentEncoder, resolve_family
from clear.shards import dist_env, index_samples, rank_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default="black-forest-labs/FLUX.1-dev")
    p.add_argument("--model_family", choices=["auto", *FAMILIES], default="auto",
                   help="auto: read it from the model's model_index.json / transformer config")
    p.add_argument("--data_root", required=True, help="folder of .tar shards and/or <key>.jpg + <key>.json, or a .tar")
    p.add_argument("--cache_dir", default=None, help="default: <data_root>_cache")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="VAE and stored features; default: bfloat16 on CUDA, float32 otherwise")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, local_rank = dist_env()
    device, dtype = rank_device(local_rank, args.dtype)
    cache_dir = args.cache_dir or default_cache_dir(args.data_root)

    try:
        family = resolve_family(args.model_family, args.pretrained_model_name_or_path)
        family.check_size(args.pretrained_model_name_or_path, args.resolution)
        samples = index_samples(args.data_root)
    except (ValueError, FileNotFoundError) as e:  # also a missing --data_root or a truncated shard
        raise SystemExit(str(e)) from e

    encoder = LatentEncoder(args.pretrained_model_name_or_path, device, dtype)
    report = write_feature_cache(samples, LATENT_CODES, cache_dir,
                                 read=functools.partial(read_image, resolution=args.resolution),
                                 encode=lambda images: encoder(torch.stack(images)),
                                 batch_size=args.batch_size, rank=rank, world_size=world,
                                 metadata={"model": args.pretrained_model_name_or_path, "family": family.name,
                                           "resolution": args.resolution})
    print(report.summary(f"latent codes in {cache_dir}", rank, world))
    return report


if __name__ == "__main__":
    main()
