"""What scripts/generate_data.py runs: the teacher generates its own training set
(:func:`clear.image_sets.generate_dataset`, with the model's family, sizes and defaults checked first)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..devices import rank_device
from ..families import resolve_family
from ..image_sets import generate_dataset, read_training_prompts
from ..shards import dist_env


def run(pretrained_model_name_or_path: str, prompts: str, output_dir: str, model_family: str = "auto",
        num_samples: int | None = None, height: int = 1024, width: int = 1024, num_inference_steps: int = 28,
        guidance_scale: float | None = None, max_sequence_length: int | None = None, seed: int = 0,
        samples_per_shard: int = 1000, batch_size: int = 1, jpeg_quality: int = 95, dtype: str = "auto") -> dict:
    """Generate this rank's shards (see scripts/generate_data.py for the options and the layout);
    a bad setting exits with its message. Prints and returns what was written."""
    rank, world, local_rank = dist_env()
    output_dir = Path(output_dir)
    try:
        family = resolve_family(model_family, pretrained_model_name_or_path)
        family.check_trains_from_data()
        for name, pixels in (("--height", height), ("--width", width)):
            family.check_size(pretrained_model_name_or_path, pixels, name=name)
        family.check_text_length(max_sequence_length)
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(str(e)) from e
    spec = family.model_spec(pretrained_model_name_or_path)  # the model's own guidance and T5 length
    guidance_scale = spec.guidance if guidance_scale is None else guidance_scale
    max_sequence_length = spec.max_sequence_length if max_sequence_length is None else max_sequence_length
    entries, bad = read_training_prompts(prompts, base_seed=seed)
    for line in bad:
        print(f"skipped prompt entry {line}", file=sys.stderr)
    entries = entries[:num_samples]
    if not entries:
        raise SystemExit(f"no usable prompts in {prompts}")

    def load_pipe():
        device, torch_dtype = rank_device(local_rank, dtype)
        pipe = family.pipeline_cls().from_pretrained(pretrained_model_name_or_path, dtype=torch_dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    call = dict(height=height, width=width, num_inference_steps=num_inference_steps,
                **family.guidance_kwargs(guidance_scale), max_sequence_length=max_sequence_length)
    meta = dict(width=width, height=height, model=pretrained_model_name_or_path,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    try:
        out = generate_dataset(load_pipe, entries, output_dir, dict(model=pretrained_model_name_or_path, **call),
                               call, samples_per_shard=samples_per_shard, batch_size=batch_size,
                               jpeg_quality=jpeg_quality, meta=meta, rank=rank, world=world)
    except ValueError as e:  # other settings than the folder's
        raise SystemExit(str(e)) from e
    written, done, shard_path = out["written"], out["skipped"], [Path(p) for p in out["shards"]]

    print(f"rank {rank}/{world}: {written} images generated, {done} already there, shards "
          f"{', '.join(p.name for p in shard_path) or '(none for this rank)'} in {output_dir}; "
          f"{len(bad)} unusable prompt entries skipped")
    return {**out, "bad_prompts": bad}
