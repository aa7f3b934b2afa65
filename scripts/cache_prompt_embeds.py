"""Cache the text encoders' outputs for every training sample, as the pipeline's own encode_prompt gives them.

    torchrun --nproc_per_node=4 scripts/cache_prompt_embeds.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --data_root data/flux_dev_1024

Writes <cache_dir>/prompt_embeds/<sample id>.safetensors: FLUX "prompt_embeds" [T, 4096]
(T5, T = --max_sequence_length, default the model's: FLUX.1-dev 512, FLUX.1-schnell 256) and
"pooled_prompt_embeds" [768] (CLIP); SD3 / SD3.5 "prompt_embeds" [77 + T, 4096] (CLIP-L and
CLIP-G tokens, zero-padded to 4096, then T5; default T = 256) and "pooled_prompt_embeds" [2048]
(CLIP-L + CLIP-G pooled); FLUX.2 "prompt_embeds" [T, 15360] (no pooled text; default T = 512);
Qwen-Image "prompt_embeds" [T, 3584] and "prompt_embeds_mask" [T] (padded with mask 0 to T,
default 512). The model family is read from the model (or --model_family) and
recorded in each file's metadata, with T. cache_dir defaults to <data_root>_cache. Rank r of W
(torchrun) takes every W-th sample; files already there are skipped, so a killed job resumes;
each file is written atomically. A sample whose JSON is missing or broken is skipped, counted
and listed at the end. Then train with --use_cached_prompt_embed.
"""

from __future__ import annotations

import argparse

from clear.commands import cache
from clear.data import PROMPT_EMBEDS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache.add_arguments(parser, batch_size=16)
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="T5 tokens per prompt; default: the model's (FLUX.1-dev 512, FLUX.1-schnell 256, SD3 256)")
    return parser.parse_args(argv)


def main(argv=None):
    return cache.run(PROMPT_EMBEDS, **vars(parse_args(argv)))


if __name__ == "__main__":
    main()
