"""Generate one model's evaluation images: one PNG per prompt, seed = --seed + index.

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

import torch

import clear
from clear.evaluation import generate_images, load_prompts

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="COCO captions JSON, .jsonl or .txt (see clear.evaluation.load_prompts)")
    p.add_argument("--out", required=True, help="folder for {key}.png and generation.json")
    p.add_argument("--num", type=int, default=None, help="number of prompts (default: all)")
    p.add_argument("--sample_seed", type=int, default=None,
                   help="with --num: a seeded random subset instead of the first --num prompts")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="diffusers FluxPipeline id or folder")
    p.add_argument("--radius", type=float, default=None, help="CLEAR window radius in tokens (default: original model)")
    p.add_argument("--down_factor", type=int, default=1, help="CLEAR pooled-token factor (with --radius)")
    p.add_argument("--checkpoint", default="released",
                   help="with --radius: 'released' (clear.download_weights), 'none' (no fine-tuned weights: "
                        "zero-shot CLEAR) or a .safetensors path")
    p.add_argument("--ckpt_dir", default="ckpt", help="where released weights are downloaded")
    p.add_argument("--backend", default="auto", choices=["auto", "dense", "flex"])
    p.add_argument("--label", default=None, help="row name in the evaluation table (default: from the variant)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0, help="image i gets seed --seed + i")
    p.add_argument("--max_sequence_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu', ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 else")
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


def variant_label(radius, down_factor) -> str:
    if radius is None:
        return "original"
    r = int(radius) if float(radius).is_integer() else radius
    return f"CLEAR r={r}" + (f", down {down_factor}" if down_factor > 1 else "")


def load_pipeline(args):
    """A diffusers FluxPipeline, with CLEAR applied and its weights loaded when --radius is given."""
    from diffusers import FluxPipeline

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = FluxPipeline.from_pretrained(args.model, dtype=dtype)
    checkpoint = None
    if args.radius is not None:
        clear.apply_clear(pipe.transformer, radius=args.radius, down_factor=args.down_factor, backend=args.backend)
        if args.checkpoint == "released":
            if not float(args.radius).is_integer():
                raise SystemExit(f"no released weights for radius {args.radius}; pass --checkpoint PATH or none")
            checkpoint = clear.download_weights(int(args.radius), args.down_factor, local_dir=args.ckpt_dir)
        elif args.checkpoint != "none":
            checkpoint = args.checkpoint
        if checkpoint is not None:
            clear.load_clear_weights(pipe.transformer, checkpoint)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, checkpoint, dtype


def main(argv=None) -> dict:
    args = parse_args(argv)
    prompts = load_prompts(args.prompts, num=args.num, sample_seed=args.sample_seed)
    pipe, checkpoint, dtype = load_pipeline(args)
    settings = {
        "label": args.label or (Path(args.model).name if args.radius is None else variant_label(args.radius, args.down_factor)),
        "model": args.model,
        "radius": args.radius,
        "down_factor": args.down_factor,
        "checkpoint": None if checkpoint is None else Path(checkpoint).name,
        "backend": args.backend if args.radius is not None else None,
        "prompts_file": Path(args.prompts).name,
        "num": args.num,
        "sample_seed": args.sample_seed,
        "dtype": str(dtype).removeprefix("torch."),
    }
    counts = generate_images(pipe, prompts, args.out, settings, height=args.height, width=args.width,
                             num_inference_steps=args.steps, guidance_scale=args.guidance, base_seed=args.seed,
                             max_sequence_length=args.max_sequence_length, batch_size=args.batch_size,
                             shard=args.shard, progress=not args.no_progress)
    print(f"{args.out}: generated {counts['generated']}, already there {counts['skipped']}, "
          f"this shard {counts['total']} of {len(prompts)} prompts")
    return counts


if __name__ == "__main__":
    main()
