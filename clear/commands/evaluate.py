"""What scripts/evaluate.py runs: the paper's Table 2 for image folders (:func:`clear.evaluation.evaluate`),
written as OUT/metrics.json and OUT/table.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..evaluation import (METRIC_KEYS, EvalConfig, ModelImages, evaluate, list_images, load_prompts, markdown_table,
                          write_report)


def check_inputs(original: str, clear: list[str], real: str | None = None, conditions: str | None = None,
                 prompts: str | None = None, metrics: str | None = None) -> None:
    """Everything the command line names, before any image or network loads: each folder exists and holds
    images, the prompts file exists, the metrics are known. Exits with one line naming the fix."""
    folders = [("--original", original, "the original model's images (scripts/generate_eval_set.py writes one)"),
               *(("--clear", f, "a CLEAR model's images (scripts/generate_eval_set.py writes one)") for f in clear),
               ("--real", real, "real images, e.g. COCO val2014"), ("--conditions", conditions, "condition images")]
    for flag, folder, what in folders:
        if folder is None:
            continue
        if not Path(folder).is_dir():
            raise SystemExit(f"{flag} {folder} does not exist (or is not a folder): pass the folder of {what}")
        try:
            found = list_images(folder)
        except ValueError as e:  # two images for one stem
            raise SystemExit(f"{flag}: {e}") from None
        if not found:
            raise SystemExit(f"{flag} {folder} holds no images (.png, .jpg, ...): pass the folder of {what}")
    if prompts is not None and not Path(prompts).is_file():
        raise SystemExit(f"--prompts {prompts} does not exist: pass the prompts file the images were made from")
    unknown = [m for m in (metrics.split(",") if metrics else []) if m not in METRIC_KEYS]
    if unknown:
        raise SystemExit(f"--metrics: unknown metric{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(m) for m in unknown)}; choose from {', '.join(METRIC_KEYS)}")


def run(original: str, clear: list[str], out: str, real: str | None = None, prompts: str | None = None,
        conditions: str | None = None, names: str | None = None, radius: float | None = None, down_factor: int = 1,
        text_len: int = 512, pixels_per_token: int = EvalConfig.tokens_per_pixel_side,
        attention_dim: int = EvalConfig.dim, metrics: str | None = None, limit: int | None = None,
        batch_size: int = 16, workers: int = min(8, os.cpu_count() or 1), device: str = "auto",
        clip_model: str = EvalConfig.clip_model, dino_model: str = EvalConfig.dino_model,
        depth_model: str = EvalConfig.depth_model, lpips_net: str = EvalConfig.lpips_net,
        is_splits: int = EvalConfig.is_splits, no_progress: bool = False, nets=None) -> dict:
    """Evaluate the ``clear`` folders against ``original`` (see scripts/evaluate.py for the options;
    ``names`` and ``metrics`` comma-separated); ``nets`` (a :class:`clear.evaluation.FeatureNets`)
    injects networks. Prints the table and returns the results."""
    row_names = names.split(",") if names else [None] * (1 + len(clear))
    if len(row_names) != 1 + len(clear):
        raise SystemExit(f"--names has {len(row_names)} names for {1 + len(clear)} folders (original + --clear)")
    check_inputs(original, clear, real, conditions, prompts, metrics)
    reference = ModelImages.from_folder(original, row_names[0], text_len=text_len)
    reference.radius, reference.down_factor, reference.variant_known = None, 1, True  # full attention
    variant = {} if radius is None else {"radius": radius, "down_factor": down_factor}
    candidates = [ModelImages.from_folder(f, n, text_len=text_len, **variant) for f, n in zip(clear, row_names[1:])]
    config = EvalConfig(metrics=tuple(metrics.split(",")) if metrics else None, clip_model=clip_model,
                        dino_model=dino_model, depth_model=depth_model, lpips_net=lpips_net,
                        is_splits=is_splits, batch_size=batch_size, workers=workers, device=device,
                        dim=attention_dim, tokens_per_pixel_side=pixels_per_token)
    try:
        results = evaluate(reference, candidates, real=real, prompts=load_prompts(prompts) if prompts else None,
                           conditions=conditions, config=config, nets=nets, limit=limit, progress=not no_progress)
    except (ValueError, FileNotFoundError) as e:  # no image in every folder, an unreadable prompts file, ...
        raise SystemExit(str(e)) from None
    js, md = write_report(results, out)
    print(markdown_table(results))
    print(f"wrote {js} and {md}")
    print(json.dumps(results["images"], indent=1))
    return results
