"""The shared options and run of scripts/cache_prompt_embeds.py and scripts/cache_latent_codes.py
(the work itself: :func:`clear.encoders.plan_cache` and :func:`clear.encoders.run_cache`)."""

from __future__ import annotations

from ..devices import DTYPE_CHOICES
from ..families import FAMILIES
from ..encoders import plan_cache, run_cache


def add_arguments(p, batch_size: int = 8) -> None:
    """The options both cache commands take, added to the ``argparse.ArgumentParser`` ``p``."""
    p.add_argument("--pretrained_model_name_or_path", default="black-forest-labs/FLUX.1-dev")
    p.add_argument("--model_family", choices=["auto", *FAMILIES], default="auto",
                   help="auto: read it from the model's model_index.json / transformer config")
    p.add_argument("--data_root", required=True, help="folder of .tar shards and/or <key>.jpg + <key>.json, or a .tar")
    p.add_argument("--cache_dir", default=None, help="default: <data_root>_cache")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="encoders and stored features; auto: bfloat16 on CUDA, float32 otherwise")


def run(kind: str, **options):
    """Check everything before any weights load (errors exit with their message), then cache this
    rank's samples of ``kind`` and print the summary. ``options``: :func:`clear.encoders.plan_cache`'s
    keyword arguments (the command line's names). Returns the :class:`clear.data.CacheReport`."""
    try:
        job = plan_cache(kind, **options)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # a missing --data_root, a truncated shard, ...
        raise SystemExit(str(e)) from e
    report = run_cache(job)
    print(report.summary(job.label, job.rank, job.world_size))
    return report
