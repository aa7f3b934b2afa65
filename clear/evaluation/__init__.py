"""Evaluation: the paper's metrics, protocol and attention FLOPs.

* :mod:`clear.evaluation.metrics`: the networks behind the learned metrics (injectable through
  :class:`FeatureNets`) and one job per (model, metric); :data:`COLUMNS` of the paper's table.
* :mod:`clear.evaluation.protocol`: prompts (:func:`load_prompts`), pairing image folders by
  file stem, :func:`evaluate` and the report (:func:`markdown_table`, :func:`write_report`).
* Evaluation sets are made by :func:`clear.image_sets.generate_images` (re-exported here).
"""

from ..image_sets import MANIFEST, generate_images
from .metrics import COLUMNS, METRIC_KEYS, EvalConfig, FeatureNets
from .protocol import (IMAGE_EXTENSIONS, ModelImages, Prompt, evaluate, json_safe, list_images, load_prompts,
                       markdown_table, read_image, write_report)

__all__ = [
    "Prompt",
    "load_prompts",
    "ModelImages",
    "EvalConfig",
    "FeatureNets",
    "COLUMNS",
    "METRIC_KEYS",
    "evaluate",
    "markdown_table",
    "write_report",
    "generate_images",
    "MANIFEST",
    "IMAGE_EXTENSIONS",
    "list_images",
    "read_image",
    "json_safe",
]
