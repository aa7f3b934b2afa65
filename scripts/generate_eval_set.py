"""Generate one model's evaluation images: one PNG per prompt, seed = --seed + index.

Any supported family (FLUX.1, SD3/SD3.5): clear.commands.generate_eval_set loads the pipeline
through clear.inference, after its pre-flight checks (model, sizes, device, checkpoint header);
--steps, --guidance and --max_sequence_length default to the model's own settings.

    # the original FLUX.1-dev
    python scripts/generate_eval_set.py --prompts captions_val2014.json --num 5000 --sample_seed 0 \\
        --out eval/flux_1024
    # CLEAR r=16 (released weights, downloaded into ckpt/)
    python scripts/generate_eval_set.py --prompts captions_val2014.json --num 5000 --sample_seed 0 \\
        --radius 16 --out eval/clear_r16_1024

Resumable: images already in --out are skipped, each image is written atomically, and a
folder made with other settings is refused. --shard i/n splits the prompts over n
processes (e.g. one per GPU: CUDA_VISIBLE_DEVICES=i ... --shard i/n).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clear.defaults import BACKEND_CHOICES
from clear.commands import generate_eval_set
from clear.devices import DTYPE_CHOICES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="COCO captions JSON, .jsonl or .txt (see clear.evaluation.load_prompts)")
    p.add_argument("--out", required=True, help="folder for {key}.png and generation.json")
    p.add_argument("--num", type=int, default=None, help="number of prompts (default: all)")
    p.add_argument("--sample_seed", type=int, default=None,
                   help="with --num: a seeded random subset instead of the first --num prompts")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="diffusers FLUX.1 or SD3/SD3.5 pipeline: Hub id or folder")
    p.add_argument("--radius", type=float, default=None, help="CLEAR window radius in tokens (default: original model)")
    p.add_argument("--down_factor", type=int, default=1, help="CLEAR pooled-token factor (with --radius)")
    p.add_argument("--checkpoint", default="released",
                   help="with --radius: 'released' (clear.download_weights; FLUX.1-dev), 'none' (no fine-tuned "
                        "weights: zero-shot CLEAR) or a .safetensors path")
    p.add_argument("--ckpt_dir", default="ckpt", help="where released weights are downloaded")
    p.add_argument("--weights_revision", default=None, help="revision (commit sha, tag, branch) of the released "
                   "weights' Hub repo (default: clear.weights.HUB_REVISION)")
    p.add_argument("--no_strict_radius", dest="strict_radius", action="store_false",
                   help="load a --checkpoint that does not say which radius it was trained for (e.g. the first "
                   "public release's attn_weights.safetensors) or says another one: you vouch for the window")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--label", default=None, help="row name in the evaluation table (default: from the variant)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="default: the model's (FLUX.1-dev 28, SD3.5-Medium 40, ...)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (FLUX.1-dev 3.5, SD3 7, ...)")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed --seed + i")
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens; default: the model's")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu', ...")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bfloat16 on CUDA, float32 else")
    p.add_argument("--cpu_offload", action="store_true", help="enable_model_cpu_offload (less GPU memory)")
    p.add_argument("--shard", default="0/1", help="i/n: generate only prompts with index %% n == i")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.radius is None and (args.down_factor != 1 or args.checkpoint not in ("released", "none")):
        p.error("--down_factor and --checkpoint need --radius (they configure CLEAR)")
    try:
        i, n = (int(x) for x in args.shard.split("/"))
    except ValueError:
        p.error(f"--shard must look like 0/4, got {args.shard!r}")
    args.shard = (i, n)
    return args


def main(argv=None) -> dict:
    return generate_eval_set.run(**vars(parse_args(argv)))


if __name__ == "__main__":
    main()
