"""What scripts/generate_eval_set.py runs: one model's evaluation images, one PNG per prompt
(:func:`clear.image_sets.generate_images`), after every check that needs no weights."""

from __future__ import annotations

from pathlib import Path

from ..devices import resolve_device


def preflight(model: str, height: int, width: int, radius: float | None = None, down_factor: int = 1,
              checkpoint: str = "released", ckpt_dir: str = "ckpt", backend: str = "auto",
              strict_radius: bool = True, steps: int | None = None, guidance: float | None = None,
              device: str = "auto", weights_revision: str | None = None, max_sequence_length: int | None = None):
    """Every check that needs no weights: device, sampling, the model (its configs, described once:
    :class:`clear.inference.PipelineInfo`), sizes, the CLEAR variant and its checkpoint (header only).
    Returns (device, pipeline description, CLEAR spec or None)."""
    from .. import inference as inf  # here: scripts/generate_eval_set.py --help stays torch-free

    device = resolve_device(device)
    inf.check_sampling(steps, guidance)
    info = inf.describe_pipeline(model)  # configs only; fails on unsupported models
    if info.family.video:
        raise ValueError(f"{model} is a {info.family.name} video model: evaluation sets are images; generate clips with "
                         "scripts/generate.py --num_frames")
    info.check_size(height, width, down_factor if radius is not None else 1)
    info.family.check_text_length(max_sequence_length)
    if radius is None:
        return device, info, None
    checkpoint = inf.resolve_checkpoint(checkpoint, radius, down_factor, ckpt_dir, family=info.family.name,
                                        strict_radius=strict_radius, revision=weights_revision)
    return device, info, inf.ClearSpec(radius, down_factor, checkpoint, backend, strict_radius)


def run(prompts: str, out: str, num: int | None = None, sample_seed: int | None = None,
        model: str = "black-forest-labs/FLUX.1-dev", radius: float | None = None, down_factor: int = 1,
        checkpoint: str = "released", ckpt_dir: str = "ckpt", strict_radius: bool = True, backend: str = "auto",
        label: str | None = None, height: int = 1024, width: int = 1024, steps: int | None = None,
        guidance: float | None = None, seed: int = 0, max_sequence_length: int | None = None, batch_size: int = 1,
        device: str = "auto", dtype: str = "auto", cpu_offload: bool = False, shard: tuple[int, int] = (0, 1),
        no_progress: bool = False, weights_revision: str | None = None) -> dict:
    """Generate the images of ``prompts`` (see scripts/generate_eval_set.py for the options) into
    ``out``; a bad setting exits with its message. Prints and returns the counts."""
    # here, not at the top: scripts/generate_eval_set.py --help stays torch-free
    from .. import inference as inf
    from ..evaluation import load_prompts
    from ..image_sets import generate_images

    entries = load_prompts(prompts, num=num, sample_seed=sample_seed)
    try:
        device, info, spec = preflight(model, height, width, radius, down_factor, checkpoint, ckpt_dir, backend,
                                       strict_radius, steps, guidance, device, weights_revision,
                                       max_sequence_length)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    pipe = inf.load_pipeline(model, str(device), dtype, offload=cpu_offload, info=info)
    pipe.set_progress_bar_config(disable=True)
    if spec is not None:
        spec.apply(pipe, family=info.family.name)
    steps, guidance, max_sequence_length = info.sampling(steps, guidance, max_sequence_length)
    settings = {
        "label": label or (Path(model).name if spec is None else spec.label),
        "model": model,
        "radius": radius,
        "down_factor": down_factor,
        "checkpoint": None if spec is None or spec.checkpoint is None else Path(spec.checkpoint).name,
        "backend": backend if spec is not None else None,
        "prompts_file": Path(prompts).name,
        "num": num,
        "sample_seed": sample_seed,
        "dtype": str(inf.resolve_dtype(dtype, str(device))).removeprefix("torch."),
    }
    counts = generate_images(pipe, entries, out, settings, height=height, width=width,
                             num_inference_steps=steps, guidance_scale=guidance, base_seed=seed,
                             max_sequence_length=max_sequence_length, batch_size=batch_size,
                             shard=shard, progress=not no_progress, family=info.family)
    print(f"{out}: generated {counts['generated']}, already there {counts['skipped']}, "
          f"this shard {counts['total']} of {len(entries)} prompts")
    return counts
