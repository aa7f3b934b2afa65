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

The work is clear.commands.generate_data (the loop: clear.image_sets.generate_dataset): each image is drawn with a CPU generator seeded
with its seed, so an image does not depend on the device, --batch_size or the rank count.
"""

from __future__ import annotations

import argparse

from clear.commands import generate_data
from clear.devices import DTYPE_CHOICES
from clear.families import FAMILIES


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
    return generate_data.run(**vars(parse_args(argv)))


if __name__ == "__main__":
    main()
