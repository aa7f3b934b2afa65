"""What scripts/evaluate.py runs: the paper's Table 2 for image folders (:func:`clear.evaluation.evaluate`),
written as OUT/metrics.json and OUT/table.md."""

from __future__ import annotations

import json
import os

from ..evaluation import EvalConfig, ModelImages, evaluate, load_prompts, markdown_table, write_report


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
    reference = ModelImages.from_folder(original, row_names[0], text_len=text_len)
    reference.radius, reference.down_factor, reference.variant_known = None, 1, True  # full attention
    variant = {} if radius is None else {"radius": radius, "down_factor": down_factor}
    candidates = [ModelImages.from_folder(f, n, text_len=text_len, **variant) for f, n in zip(clear, row_names[1:])]
    config = EvalConfig(metrics=tuple(metrics.split(",")) if metrics else None, clip_model=clip_model,
                        dino_model=dino_model, depth_model=depth_model, lpips_net=lpips_net,
                        is_splits=is_splits, batch_size=batch_size, workers=workers, device=device,
                        dim=attention_dim, tokens_per_pixel_side=pixels_per_token)
    results = evaluate(reference, candidates, real=real, prompts=load_prompts(prompts) if prompts else None,
                       conditions=conditions, config=config, nets=nets, limit=limit, progress=not no_progress)
    js, md = write_report(results, out)
    print(markdown_table(results))
    print(f"wrote {js} and {md}")
    print(json.dumps(results["images"], indent=1))
    return results
