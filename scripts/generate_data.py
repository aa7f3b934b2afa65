"""The teacher generates its own training set (CLEAR distils FLUX.1-dev on ~10K images it made).

Works with any supported family's text-to-image pipeline (FLUX.1: FluxPipeline; SD3 / SD3.5:
StableDiffusion3Pipeline), read from the model (or --model_family); --guidance_scale and
--max_sequence_length default to the model's own settings (FLUX.1-dev 3.5 / 512; SD3 7,
SD3.5-Medium 4.5, SD3.5-Large 3.5 (classifier-free) / 256).

    torchrun --nproc_per_node=4 scripts/generate_data.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --prompts prompts.txt --output_dir data/flux_dev_1024

--prompts is a text file (one prompt per line), JSON lines ({"prompt": ..., optional "key"
and "seed"}), or a tar in the layout of text-to-image-2M's data_1024_10K shard (<key>.json
with a "prompt" field), read in place without untarring.

Output: webdataset shards <output_dir>/shard-00000.tar, ... with <key>.jpg and <key>.json
({"key", "prompt", "seed", "width", "height", "model", "num_inference_steps", "guidance_scale"}).
Shard s holds prompts [s*N, (s+1)*N) (N = --samples_per_shard); rank r of W makes the
shards with s % W == r. Each image is first written atomically to
<output_dir>/.staging/shard-xxxxx/, and a shard is packed (temp file + rename) once all of
its images exist, so a killed job resumes where it stopped: finished shards and staged
images are skipped. The settings are recorded in <output_dir>/.generation.json; resuming
with different settings is refused.

The loop is clear.generation.generate_dataset: each image is drawn with a CPU generator seeded
with its seed, so an image does not depend on the device, --batch_size or the rank count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clear.devices import DTYPE_CHOICES, rank_device
from clear.families import FAMILIES, resolve_family
from clear.generation import generate_dataset, read_training_prompts
from clear.shards import dist_env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default="black-forest-labs/FLUX.1-dev")
    p.add_argument("--model_family", choices=["auto", *FAMILIES], default="auto",
                   help="auto: read it from the model's model_index.json / transformer config")
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line), .jsonl, or a text-to-image-2M .tar")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_samples", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--num_inference_steps", type=int, default=28)
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="default: the model's (FLUX.1-dev 3.5, SD3 7, SD3.5-Medium 4.5, SD3.5-Large 3.5)")
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens; default: the model's (FLUX.1-dev 512, FLUX.1-schnell 256, SD3 256)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i unless its JSON line gives a seed")
    p.add_argument("--samples_per_shard", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=1, help="images generated per pipeline call")
    p.add_argument("--jpeg_quality", type=int, default=95)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bfloat16 on CUDA, float32 otherwise")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, local_rank = dist_env()
    output_dir = Path(args.output_dir)
    try:
        family = resolve_family(args.model_family, args.pretrained_model_name_or_path)
        for name, pixels in (("--height", args.height), ("--width", args.width)):
            family.check_size(args.pretrained_model_name_or_path, pixels, name=name)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    spec = family.model_spec(args.pretrained_model_name_or_path)  # the model's own guidance and T5 length
    args.guidance_scale = spec.guidance if args.guidance_scale is None else args.guidance_scale
    args.max_sequence_length = args.max_sequence_length or spec.max_sequence_length
    prompts, bad = read_training_prompts(args.prompts, base_seed=args.seed)
    for line in bad:
        print(f"skipped prompt entry {line}", file=sys.stderr)
    prompts = prompts[: args.num_samples]
    if not prompts:
        raise SystemExit(f"no usable prompts in {args.prompts}")

    def load_pipe():
        device, dtype = rank_device(local_rank, args.dtype)
        pipe = family.pipeline_cls().from_pretrained(args.pretrained_model_name_or_path, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    call = dict(height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                **family.guidance_kwargs(args.guidance_scale), max_sequence_length=args.max_sequence_length)
    meta = dict(width=args.width, height=args.height, model=args.pretrained_model_name_or_path,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    try:
        out = generate_dataset(load_pipe, prompts, output_dir, dict(model=args.pretrained_model_name_or_path, **call),
                               call, samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
                               jpeg_quality=args.jpeg_quality, meta=meta, rank=rank, world=world)
    except ValueError as e:  # other settings than the folder's
        raise SystemExit(str(e)) from e
    written, done, shard_path = out["written"], out["skipped"], [Path(p) for p in out["shards"]]

    print(f"rank {rank}/{world}: {written} images generated, {done} already there, shards "
          f"{', '.join(p.name for p in shard_path) or '(none for this rank)'} in {output_dir}; "
          f"{len(bad)} unusable prompt entries skipped")
    return {**out, "bad_prompts": bad}


if __name__ == "__main__":
    main()
