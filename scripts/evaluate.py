"""Evaluate CLEAR against the original model: the paper's Table 2 as JSON + markdown.

    python scripts/evaluate.py --prompts annotations/captions_val2014.json \\
        --original eval/flux_1024 --clear eval/clear_r16_1024 [--clear eval/clear_r8_1024 ...] \\
        --real coco/val2014 --out results/table2_1024

Writes OUT/metrics.json and OUT/table.md. Images are paired by file stem; unpaired,
prompt-less or unreadable images are skipped and counted in the report. Folders made by
scripts/generate_eval_set.py carry their variant (for the GFLOPs column) in
generation.json; for other folders pass --radius/--down_factor. The work is clear.commands.evaluate.
"""

from __future__ import annotations

import argparse
import os

from clear.commands import evaluate
from clear.evaluation import METRIC_KEYS, EvalConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", required=True, help="folder of the original model's images (the reference)")
    p.add_argument("--clear", required=True, action="append", metavar="FOLDER",
                   help="folder of a CLEAR model's images; repeat for several rows")
    p.add_argument("--real", default=None, help="folder of real images (e.g. COCO val2014), paired by file stem")
    p.add_argument("--prompts", default=None, help="prompts file (COCO captions JSON, .jsonl, .txt); needed for CLIP-T")
    p.add_argument("--conditions", default=None, help="ControlNet condition images, paired by stem (RMSE column)")
    p.add_argument("--out", required=True, help="output folder for metrics.json and table.md")
    p.add_argument("--names", default=None, help="comma-separated row names: original, then each --clear")
    p.add_argument("--radius", type=float, default=None,
                   help="CLEAR radius for --clear folders without generation.json (for GFLOPs)")
    p.add_argument("--down_factor", type=int, default=1, help="with --radius")
    p.add_argument("--text_len", type=int, default=512, help="T5 tokens, for folders without generation.json")
    p.add_argument("--pixels_per_token", type=int, default=EvalConfig.tokens_per_pixel_side,
                   help="image pixels per token side, for GFLOPs (FLUX.1, SD3: 16 = VAE x8, 2x2 patches)")
    p.add_argument("--attention_dim", type=int, default=EvalConfig.dim,
                   help="attention width (heads x head dim), for GFLOPs (FLUX.1: 3072)")
    p.add_argument("--metrics", default=None, help=f"comma-separated subset of: {','.join(METRIC_KEYS)}")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N paired images")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-loading processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--clip_model", default=EvalConfig.clip_model)
    p.add_argument("--dino_model", default=EvalConfig.dino_model)
    p.add_argument("--depth_model", default=EvalConfig.depth_model, help="condition extractor for the RMSE column")
    p.add_argument("--lpips_net", default=EvalConfig.lpips_net, choices=["alex", "vgg", "squeeze"])
    p.add_argument("--is_splits", type=int, default=EvalConfig.is_splits)
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None, nets=None) -> dict:
    """Run the evaluation; ``nets`` (a :class:`clear.evaluation.FeatureNets`) injects networks."""
    return evaluate.run(**vars(parse_args(argv)), nets=nets)


if __name__ == "__main__":
    main()
