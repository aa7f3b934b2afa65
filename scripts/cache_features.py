"""The shared command line of scripts/cache_prompt_embeds.py and scripts/cache_latent_codes.py
(the work itself: clear.encoders.plan_cache / run_cache)."""

from __future__ import annotations

import argparse

from clear.devices import DTYPE_CHOICES
from clear.families import FAMILIES


def main(kind: str, doc: str, argv=None, batch_size: int = 8, extra=None):
    """Parse the shared arguments (plus ``extra(parser)``'s), check everything before any weights
    load (errors exit with their message), then cache this rank's samples and print the summary."""
    from clear.encoders import plan_cache, run_cache

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default="black-forest-labs/FLUX.1-dev")
    p.add_argument("--model_family", choices=["auto", *FAMILIES], default="auto",
                   help="auto: read it from the model's model_index.json / transformer config")
    p.add_argument("--data_root", required=True, help="folder of .tar shards and/or <key>.jpg + <key>.json, or a .tar")
    p.add_argument("--cache_dir", default=None, help="default: <data_root>_cache")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="encoders and stored features; auto: bfloat16 on CUDA, float32 otherwise")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    try:
        job = plan_cache(kind, args.pretrained_model_name_or_path, args.data_root, args.cache_dir, args.model_family,
                         args.batch_size, args.dtype, getattr(args, "max_sequence_length", None),
                         getattr(args, "resolution", None))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # also a missing --data_root, a truncated shard
        raise SystemExit(str(e)) from e
    report = run_cache(job)
    print(report.summary(job.label, job.rank, job.world_size))
    return report
