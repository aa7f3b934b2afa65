"""Cache the text encoders' outputs for every training sample, as the pipeline's own encode_prompt gives them.

    torchrun --nproc_per_node=4 scripts/cache_prompt_embeds.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --data_root data/flux_dev_1024

Writes <cache_dir>/prompt_embeds/<sample id>.safetensors: FLUX "prompt_embeds" [T, 4096]
(T5, T = --max_sequence_length, default 512) and "pooled_prompt_embeds" [768] (CLIP); SD3 /
SD3.5 "prompt_embeds" [77 + T, 4096] (CLIP-L and CLIP-G tokens, zero-padded to 4096, then
T5; default T = 256) and "pooled_prompt_embeds" [2048] (CLIP-L + CLIP-G pooled). The model
family is read from the model (or --model_family) and recorded in each file's metadata.
cache_dir defaults to <data_root>_cache. Rank r of W (torchrun) takes every W-th sample;
files already there are skipped, so a killed job resumes; each file is written atomically.
A sample whose JSON is missing or broken is skipped, counted and listed at the end. Then
train with --use_cached_prompt_embed.
"""

from __future__ import annotations

import argparse

from clear.data import PROMPT_EMBEDS, default_cache_dir, read_prompt, write_feature_cache
from clear.features import FAMILIES, PromptEncoder, resolve_family
from clear.shards import dist_env, index_samples, rank_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default="black-forest-labs/FLUX.1-dev")
    p.add_argument("--model_family", choices=["auto", *FAMILIES], default="auto",
                   help="auto: read it from the model's model_index.json / transformer config")
    p.add_argument("--data_root", required=True, help="folder of .tar shards and/or <key>.jpg + <key>.json, or a .tar")
    p.add_argument("--cache_dir", default=None, help="default: <data_root>_cache")
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5 tokens per prompt; default: FLUX 512, SD3 256")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="encoders and stored features; default: bfloat16 on CUDA, float32 otherwise")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, local_rank = dist_env()
    device, dtype = rank_device(local_rank, args.dtype)
    cache_dir = args.cache_dir or default_cache_dir(args.data_root)

    try:
        family = resolve_family(args.model_family, args.pretrained_model_name_or_path)
        samples = index_samples(args.data_root)
    except (ValueError, FileNotFoundError) as e:  # also a missing --data_root or a truncated shard
        raise SystemExit(str(e)) from e

    encoder = PromptEncoder(args.pretrained_model_name_or_path, device, dtype, args.max_sequence_length, family)
    report = write_feature_cache(samples, PROMPT_EMBEDS, cache_dir, read=read_prompt, encode=encoder,
                                 batch_size=args.batch_size, rank=rank, world_size=world,
                                 metadata={"model": args.pretrained_model_name_or_path, "family": family.name,
                                           "max_sequence_length": encoder.max_sequence_length})
    print(report.summary(f"prompt embeddings in {cache_dir}", rank, world))
    return report


if __name__ == "__main__":
    main()
