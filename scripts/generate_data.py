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
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clear.families import FAMILIES, resolve_family
from clear.shards import dist_env, rank_device, split_key, write_bytes_atomic, write_tar_atomic


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
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 otherwise")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Prompt:
    key: str
    prompt: str
    seed: int | None = None


_KEY = re.compile(r"[A-Za-z0-9_-]+")


def read_prompts(path: Path) -> tuple[list[Prompt], list[str]]:
    """The prompts of a .txt / .jsonl / .tar file, and a list of the entries that were unusable."""
    prompts, bad = [], []
    if path.suffix == ".tar":
        from clear.data import BadSampleError, read_prompt
        from clear.shards import index_samples

        for sample in index_samples(path):
            try:
                prompts.append(Prompt(re.sub(r"[^A-Za-z0-9_-]", "_", sample.id), read_prompt(sample)))
            except BadSampleError as e:
                bad.append(f"{path}:{sample.id}: {e}")
    elif path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                prompt = entry["prompt"]
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError("empty prompt")
                key = str(entry["key"]) if "key" in entry else None
                if key is not None and not _KEY.fullmatch(key):
                    raise ValueError(f"key {key!r} may only hold letters, digits, '_' and '-'")
                seed = entry.get("seed")
                prompts.append(Prompt(key, prompt, None if seed is None else int(seed)))
            except (ValueError, KeyError, TypeError) as e:
                bad.append(f"{path}:{n}: {type(e).__name__}: {e}")
    else:
        prompts = [Prompt(None, line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [Prompt(p.key or f"{i:08d}", p.prompt, p.seed) for i, p in enumerate(prompts)]
    dup = sorted(k for k, n in Counter(p.key for p in prompts).items() if n > 1)
    if dup:
        raise ValueError(f"{path} gives the same key to several prompts: {', '.join(dup[:5])}; keys must be unique")
    return prompts, bad


def check_manifest(output_dir: Path, settings: dict) -> None:
    """Record the settings that define the data set, or refuse to resume with other ones."""
    manifest = output_dir / ".generation.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        diff = [f"{k}: was {old.get(k)!r}, now {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise SystemExit(f"{output_dir} was generated with other settings ({'; '.join(diff)}). Resume with the "
                             "same settings, or pass a new --output_dir.")
    else:
        write_bytes_atomic(manifest, json.dumps(settings, indent=1).encode())


def staged_keys(staging: Path) -> set[str]:
    """Keys whose image and metadata are both staged (the .json is written last)."""
    return {split_key(p.name)[0] for p in staging.glob("*.json")} if staging.is_dir() else set()


def pack_shard(shard_path: Path, staging: Path, items: list[Prompt]) -> None:
    write_tar_atomic(shard_path, [(p.key, {"jpg": (staging / f"{p.key}.jpg").read_bytes(),
                                           "json": (staging / f"{p.key}.json").read_bytes()}) for p in items])
    shutil.rmtree(staging)


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
    prompts, bad = read_prompts(Path(args.prompts))
    for line in bad:
        print(f"skipped prompt entry {line}", file=sys.stderr)
    prompts = prompts[: args.num_samples]
    if not prompts:
        raise SystemExit(f"no usable prompts in {args.prompts}")
    base_seed = args.seed
    prompts = [Prompt(p.key, p.prompt, base_seed + i if p.seed is None else p.seed) for i, p in enumerate(prompts)]

    digest = hashlib.sha256(json.dumps([[p.key, p.prompt, p.seed] for p in prompts]).encode()).hexdigest()
    settings = {"model": args.pretrained_model_name_or_path, "prompts_digest": digest, "num_samples": len(prompts),
                "height": args.height, "width": args.width, "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale, "max_sequence_length": args.max_sequence_length,
                "samples_per_shard": args.samples_per_shard}
    output_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(output_dir, settings)

    n_shards = math.ceil(len(prompts) / args.samples_per_shard)
    mine = [s for s in range(n_shards) if s % world == rank]
    shard_path = {s: output_dir / f"shard-{s:05d}.tar" for s in mine}
    staging = {s: output_dir / ".staging" / f"shard-{s:05d}" for s in mine}
    items = {s: prompts[s * args.samples_per_shard: (s + 1) * args.samples_per_shard] for s in mine}
    todo = {s: [p for p in items[s] if p.key not in staged_keys(staging[s])]
            for s in mine if not shard_path[s].exists()}
    done = sum(len(items[s]) for s in mine) - sum(len(v) for v in todo.values())

    written = 0
    if any(todo.values()):
        device, dtype = rank_device(local_rank, args.dtype)
        pipe = family.pipeline_cls().from_pretrained(args.pretrained_model_name_or_path, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        bar = tqdm(total=sum(len(v) for v in todo.values()), desc=f"generate (rank {rank})", disable=False)
        for s, pending in todo.items():
            for i in range(0, len(pending), args.batch_size):
                batch = pending[i: i + args.batch_size]
                images = pipe(prompt=[p.prompt for p in batch], height=args.height, width=args.width,
                              num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                              max_sequence_length=args.max_sequence_length,
                              generator=[torch.Generator(device).manual_seed(p.seed) for p in batch]).images
                for p, image in zip(batch, images):
                    buf = io.BytesIO()
                    image.save(buf, format="JPEG", quality=args.jpeg_quality)
                    meta = {"key": p.key, "prompt": p.prompt, "seed": p.seed, "width": args.width,
                            "height": args.height, "model": args.pretrained_model_name_or_path,
                            "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
                    write_bytes_atomic(staging[s] / f"{p.key}.jpg", buf.getvalue())
                    write_bytes_atomic(staging[s] / f"{p.key}.json", json.dumps(meta).encode())
                written += len(batch)
                bar.update(len(batch))
        bar.close()
    for s in mine:
        if not shard_path[s].exists():
            pack_shard(shard_path[s], staging[s], items[s])
    try:
        (output_dir / ".staging").rmdir()  # only when empty: other ranks may still be staging
    except OSError:
        pass

    print(f"rank {rank}/{world}: {written} images generated, {done} already there, shards "
          f"{', '.join(p.name for p in shard_path.values()) or '(none for this rank)'} in {output_dir}; "
          f"{len(bad)} unusable prompt entries skipped")
    return {"written": written, "skipped": done, "shards": [str(p) for p in shard_path.values()], "bad_prompts": bad}


if __name__ == "__main__":
    main()
