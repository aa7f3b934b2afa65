"""The evaluation protocol: prompts, pairing image folders by file stem, :func:`evaluate`
(the paper's Table 2) and the report (JSON + markdown).

The protocol (Table 2 of the paper): one caption per image of a COCO-2014 validation
subset; every model generates one image per caption with the same seed; then

* against the original model's images (same prompt, same seed): FID, LPIPS, CLIP image
  similarity (CLIP-I), DINO similarity, PSNR, SSIM, MS-SSIM;
* against the real COCO images: FID and LPIPS;
* text alignment CLIP-T (CLIPScore), Inception Score, and the attention GFLOPs per layer
  (:func:`clear.attention_flops`); for ControlNet, the RMSE between each condition image
  and the condition re-extracted from the generated image.

Images are paired across folders by file stem (``000000391895.png`` in every folder), as
:func:`clear.image_sets.generate_images` writes them; :func:`load_prompts` reads COCO
caption files, ``.txt`` and ``.jsonl`` prompt lists.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..files import write_text
from ..image_sets import MANIFEST
from ..geometry import attention_flops
from .metrics import (COLUMNS, METRIC_DEFINITIONS, METRIC_KEYS, EvalConfig, FeatureNets, Job, Unavailable, clip_job,
                      dino_job, fid_job, image_pair_job, inception_score_job, lpips_job, resolve_net, rmse_job)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt and the file stem its images get in every folder."""

    key: str
    text: str


def _check_key(key: str, where: str) -> str:
    if not key or key.startswith(".") or any(c in key for c in '/\\:*?"<>|\n'):
        raise ValueError(f"{where}: {key!r} cannot be a file name; give prompts keys without path characters")
    return key


def _prompt_from_record(rec: Any, index: int, where: str) -> tuple[str | None, str]:
    if isinstance(rec, str):
        return None, rec
    if isinstance(rec, dict):
        text = next((rec[k] for k in ("prompt", "caption", "text") if isinstance(rec.get(k), str)), None)
        if text is not None:
            key = next((rec[k] for k in ("key", "id", "image_id") if rec.get(k) is not None), None)
            return (None if key is None else str(key)), text
    raise ValueError(f"{where}: record {index} has no prompt; expected a string or an object with "
                     f"'prompt', 'caption' or 'text' (and optionally 'key', 'id' or 'image_id'), got {rec!r:.120}")


def _coco_prompts(data: dict, where: str) -> list[Prompt]:
    """One caption per image (its first in the file), keyed by the image's file stem
    (``COCO_val2014_000000391895``) so the real images pair by name, in image-id order."""
    stems = {img["id"]: Path(img["file_name"]).stem for img in data.get("images", []) if "file_name" in img}
    first: dict[Any, str] = {}
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{where}: annotation {i} lacks 'image_id' or 'caption' (a COCO captions file has both)")
        first.setdefault(ann["image_id"], " ".join(ann["caption"].split()))
    return [Prompt(stems.get(i, str(i)), c) for i, c in sorted(first.items())]


def load_prompts(path: str | os.PathLike, num: int | None = None, sample_seed: int | None = None) -> list[Prompt]:
    """Read prompts from a COCO captions JSON (``annotations`` with ``image_id``/``caption``;
    one caption per image, keyed by the image file stem), a JSON list, a ``.jsonl`` file
    (strings or objects with ``prompt``/``caption``/``text`` and optional ``key``/``id``/
    ``image_id``) or a ``.txt`` file (one prompt per non-empty line). Prompts without a key
    get their zero-padded index. ``num`` keeps the first ``num`` prompts, or with
    ``sample_seed`` a seeded random subset (in file order), e.g. the paper's 5,000 images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    where = str(path)
    raw: list[tuple[str | None, str]]
    if path.suffix.lower() == ".txt":
        raw = [(None, line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix.lower() == ".jsonl":
        raw = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}:{n}: not JSON ({e.msg})") from None
                raw.append(_prompt_from_record(rec, n, where))
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}); use .txt for one prompt per line") from None
        if isinstance(data, dict) and "annotations" in data:
            raw = [(p.key, p.text) for p in _coco_prompts(data, where)]
        elif isinstance(data, list):
            raw = [_prompt_from_record(rec, i, where) for i, rec in enumerate(data)]
        else:
            raise ValueError(f"{where}: expected a COCO captions file (with 'annotations') or a list of prompts")
    if not raw:
        raise ValueError(f"{where} holds no prompts")
    width = max(5, len(str(len(raw) - 1)))
    prompts = [Prompt(_check_key(k if k is not None else f"{i:0{width}d}", where), t.strip())
               for i, (k, t) in enumerate(raw)]
    seen: set[str] = set()
    for p in prompts:
        if p.key in seen:
            raise ValueError(f"{where}: two prompts have the key {p.key!r}; keys name the image files and must be unique")
        seen.add(p.key)
        if not p.text:
            raise ValueError(f"{where}: the prompt for {p.key!r} is empty")
    if num is not None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if num > len(prompts):
            raise ValueError(f"asked for {num} prompts but {where} has {len(prompts)}")
        if sample_seed is None:
            prompts = prompts[:num]
        else:
            keep = sorted(random.Random(sample_seed).sample(range(len(prompts)), num))
            prompts = [prompts[i] for i in keep]
    return prompts


# ----------------------------------------------------------------------------------------
# Folders and images
# ----------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike) -> dict[str, Path]:
    """``{stem: path}`` of the images in ``folder`` (hidden and temporary files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (or is not a folder)")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            if p.stem in out:
                raise ValueError(f"{folder} has two images for {p.stem!r} ({out[p.stem].name}, {p.name}); keep one")
            out[p.stem] = p
    return out


def read_image(path: Path, size: tuple[int, int] | None = None) -> Tensor:
    """uint8 ``[3, H, W]``; with ``size=(width, height)`` resized to cover it and center-cropped."""
    from PIL import Image, ImageOps  # here: PIL loads after --help

    with Image.open(path) as img:
        img.load()
        img = img.convert("RGB")
    if size is not None and img.size != tuple(size):
        img = ImageOps.fit(img, tuple(size), method=Image.Resampling.BICUBIC)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


@dataclass
class ModelImages:
    """One model's images and the attention variant that made them (for the GFLOPs column):
    ``radius=None`` is full attention; ``text_len`` is the T5 sequence length;
    ``variant_known=False`` leaves GFLOPs unavailable (a folder with no record of it)."""

    name: str
    folder: Path
    radius: float | None = None
    down_factor: int = 1
    text_len: int = 512
    variant_known: bool = True

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, name: str | None = None, **defaults) -> "ModelImages":
        """Read the variant from the folder's ``generation.json`` when there is one; ``defaults``
        (``radius``, ``down_factor``, ``text_len``) fill in what it does not say."""
        folder = Path(folder)
        info = {}
        if (folder / MANIFEST).is_file():
            info = json.loads((folder / MANIFEST).read_text())["settings"]
        fields = dict(defaults)
        for key, src in (("radius", "radius"), ("down_factor", "down_factor"), ("text_len", "max_sequence_length")):
            if src in info:
                fields[key] = info[src]
        fields["variant_known"] = "radius" in fields
        return cls(name or info.get("label") or folder.name, Path(folder), **fields)


class _PairedImages(torch.utils.data.Dataset):
    """Item ``i``: (stem, {role: uint8 [3, H, W]} or None, why it was skipped or None)."""

    def __init__(self, stems: Sequence[str], paths: dict[str, dict[str, Path]], size: tuple[int, int],
                 resized: set[str]):
        self.stems, self.paths, self.size, self.resized = list(stems), paths, size, resized

    def __len__(self):
        return len(self.stems)

    def __getitem__(self, i):
        stem, images = self.stems[i], {}
        for role, paths in self.paths.items():
            try:
                img = read_image(paths[stem], self.size if role in self.resized else None)
            except Exception as e:  # noqa: BLE001 - unreadable image: skipped and reported
                return stem, None, f"{role}: {paths[stem].name}: unreadable ({type(e).__name__}: {e})"
            if tuple(img.shape[1:]) != (self.size[1], self.size[0]):
                return stem, None, (f"{role}: {paths[stem].name} is {img.shape[2]}x{img.shape[1]}, "
                                    f"the original images are {self.size[0]}x{self.size[1]}")
            images[role] = img
        return stem, images, None


def _gflops(m: ModelImages, size: tuple[int, int], config: EvalConfig) -> float:
    if not m.variant_known:
        raise Unavailable(f"the attention variant of {m.folder} is unknown (no {MANIFEST}); give its radius "
                           "(scripts/evaluate.py --radius/--down_factor)")
    t = config.tokens_per_pixel_side
    if size[0] % t or size[1] % t:
        raise Unavailable(f"{size[0]}x{size[1]} pixels is not a whole number of {t}x{t}-pixel tokens")
    try:
        return attention_flops(size[1] // t, size[0] // t, m.radius, text_len=m.text_len, down_factor=m.down_factor,
                               dim=config.dim) / 1e9
    except ValueError as e:  # e.g. a token grid not divisible by the down factor
        raise Unavailable(str(e)) from None



# ----------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------


def evaluate(original: ModelImages, candidates: Sequence[ModelImages], *, real: str | os.PathLike | None = None,
             prompts: Sequence[Prompt] | None = None, conditions: str | os.PathLike | None = None,
             config: EvalConfig | None = None, nets: FeatureNets | None = None, limit: int | None = None,
             progress: bool = True) -> dict:
    """Compute the paper's table for ``original`` (the reference row) and each candidate.

    Images are paired by file stem across the original folder, every candidate folder,
    ``real`` and ``conditions`` (when given); stems missing from any folder, or without a
    prompt (when ``prompts`` is given), or unreadable in any folder, are skipped and
    counted. Returns a JSON-ready dict: ``models[name]["metrics"]`` has every key of
    :data:`METRIC_KEYS` (None where not applicable or unavailable, with the reason in
    ``models[name]["notes"]``)."""
    config = config or EvalConfig()
    nets = nets or FeatureNets()
    requested = set(METRIC_KEYS if config.metrics is None else config.metrics)
    unknown = requested - set(METRIC_KEYS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRIC_KEYS)}")
    models = [original, *candidates]
    names = [m.name for m in models]
    if len(set(names)) != len(names) or {"real", "__condition__", "__prompts__"} & set(names):
        raise ValueError(f"model names must be unique and not 'real', got {names}")
    if not candidates:
        raise ValueError("give at least one model to compare with the original")
    device = resolve_device(config.device)

    # --- pair the folders by stem ------------------------------------------------------
    paths = {m.name: list_images(m.folder) for m in models}
    if real is not None:
        paths["real"] = list_images(real)
    if conditions is not None:
        paths["__condition__"] = list_images(conditions)
    paired = set.intersection(*(set(p) for p in paths.values()))
    unpaired = {("conditions" if role == "__condition__" else role): len(set(p) - paired) for role, p in paths.items()}
    prompt_of = None if prompts is None else {p.key: p.text for p in prompts}
    no_prompt = sorted(paired - set(prompt_of)) if prompt_of is not None else []
    stems = sorted(paired - set(no_prompt))
    if limit is not None:
        stems = stems[:limit]
    if not stems:
        examples = {role: sorted(p)[:3] for role, p in paths.items()}
        raise ValueError("no image is in every folder" + (" and has a prompt" if prompt_of is not None else "")
                         + f"; images are paired by file stem. First stems per folder: {examples}"
                         + (f"; first prompt keys: {sorted(prompt_of)[:3]}" if prompt_of is not None else ""))

    size = None
    for stem in stems:
        try:
            img = read_image(paths[original.name][stem])
        except Exception:  # noqa: BLE001 - counted when the loader meets it
            continue
        size = (img.shape[2], img.shape[1])
        break
    if size is None:
        raise ValueError(f"none of the {len(stems)} paired images of {original.folder} can be read")

    # --- one job per (model, metric) ----------------------------------------------------
    injected = [f for f in ("fid", "inception", "lpips", "clip", "dino", "condition") if getattr(nets, f) is not None]
    notes: dict[str, dict[str, str]] = {n: {} for n in names}
    jobs: list[Job] = []
    failures: dict[str, str] = {}

    def add(model: str, key: str, builder, net: str | None, ref: str | None, **kwargs):
        if key not in requested:
            notes[model][key] = "not requested"
            return
        try:
            module = None if net is None else resolve_net(nets, net, config, device, failures)
            jobs.append(builder(model, key, module, ref, device, **kwargs))
        except Unavailable as e:
            notes[model][key] = f"unavailable: {e}"

    # here: torchmetrics loads after --help
    from torchmetrics.image import (MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio,
                                    StructuralSimilarityIndexMeasure)

    psnr = partial(PeakSignalNoiseRatio, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")  # per image
    ref = original.name
    for m in candidates:
        n = m.name
        add(n, "fid_original", fid_job, "fid", ref)
        add(n, "lpips_original", lpips_job, "lpips", ref)
        add(n, "clip_i", clip_job, "clip", ref)
        add(n, "dino", dino_job, "dino", ref)
        add(n, "psnr", image_pair_job, None, ref, factory=psnr)
        add(n, "ssim", image_pair_job, None, ref, factory=partial(StructuralSimilarityIndexMeasure, data_range=1.0))
        add(n, "ms_ssim", image_pair_job, None, ref,
            factory=partial(MultiScaleStructuralSimilarityIndexMeasure, data_range=1.0))
    for key in ("fid_original", "lpips_original", "clip_i", "dino", "psnr", "ssim", "ms_ssim"):
        notes[ref].setdefault(key, "not applicable: this is the reference model")
    for n in names:
        if real is None:
            notes[n].update(fid_real="not applicable: no real images given", lpips_real="not applicable: no real images given")
        else:
            add(n, "fid_real", fid_job, "fid", "real")
            add(n, "lpips_real", lpips_job, "lpips", "real")
        if prompt_of is None:
            notes[n]["clip_t"] = "not applicable: no prompts given"
        else:
            add(n, "clip_t", clip_job, "clip", None)
        add(n, "inception_score", inception_score_job, "inception", None, splits=config.is_splits)
        if conditions is None:
            notes[n]["rmse_condition"] = "not applicable: no condition images given"
        else:
            add(n, "rmse_condition", rmse_job, "condition", "__condition__")

    # --- one pass over the images --------------------------------------------------------
    loader = torch.utils.data.DataLoader(
        _PairedImages(stems, paths, size, resized={"real", "__condition__"}),
        batch_size=config.batch_size, num_workers=config.workers, collate_fn=list)
    skipped: dict[str, str] = {}
    evaluated = 0
    with torch.inference_mode():
        for items in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
            ok = [(stem, imgs) for stem, imgs, why in items if imgs is not None]
            skipped.update({stem: why for stem, imgs, why in items if imgs is None})
            if not ok:
                continue
            batch = {role: torch.stack([imgs[role] for _, imgs in ok]).to(device) for role in paths}
            if prompt_of is not None:
                batch["__prompts__"] = [prompt_of[stem] for stem, _ in ok]
            evaluated += len(ok)
            for job in jobs:
                if job.failed is None:
                    try:
                        job.update(batch)
                    except Exception as e:  # noqa: BLE001 - reported as unavailable with the reason
                        job.failed = f"failed: {type(e).__name__}: {str(e)[:300]}"

        results: dict[str, dict[str, Any]] = {n: {} for n in names}
        for job in tqdm(jobs, desc="computing", unit="metric", disable=not progress):
            if job.failed is None:
                try:
                    results[job.model].update(job.compute())
                except Exception as e:  # noqa: BLE001 - e.g. FID with fewer than 2 images
                    job.failed = f"failed: {type(e).__name__}: {str(e)[:300]}"
            if job.failed is not None:
                notes[job.model][job.key] = job.failed

    for m in models:
        if "gflops" in requested:
            try:
                results[m.name]["gflops"] = _gflops(m, size, config)
            except Unavailable as e:
                notes[m.name]["gflops"] = f"unavailable: {e}"
        else:
            notes[m.name]["gflops"] = "not requested"

    out_models = {}
    for m in models:
        metrics = {key: results[m.name].get(key) for key in METRIC_KEYS}
        if "inception_score_std" in results[m.name]:
            metrics["inception_score_std"] = results[m.name]["inception_score_std"]
        out_models[m.name] = {
            "role": "original" if m is original else "candidate",
            "folder": str(m.folder),
            "variant": {"radius": m.radius, "down_factor": m.down_factor, "text_len": m.text_len},
            "metrics": metrics,
            "notes": {k: v for k, v in notes[m.name].items() if metrics.get(k) is None},
        }
    return {
        "protocol": {
            "resolution": {"width": size[0], "height": size[1],
                           "tokens": [size[1] // config.tokens_per_pixel_side, size[0] // config.tokens_per_pixel_side]},
            "original": original.name,
            "real_images": None if real is None else str(real),
            "condition_images": None if conditions is None else str(conditions),
            "feature_models": {"clip": config.clip_model, "dino": config.dino_model, "lpips": config.lpips_net,
                               "fid_feature": config.fid_feature, "is_splits": config.is_splits,
                               "depth": config.depth_model,
                               "injected": injected},  # these were passed in: the names above do not apply to them
            "attention_dim": config.dim,
            "metric_definitions": METRIC_DEFINITIONS,
            "versions": _versions(),
        },
        "images": {
            "evaluated": evaluated,
            "paired": len(stems),
            "skipped_unreadable_or_wrong_size": len(skipped),
            "skipped_examples": dict(list(skipped.items())[:20]),
            "without_prompt": len(no_prompt),
            "without_prompt_examples": no_prompt[:20],
            "limit": limit,
            "unpaired_per_folder": unpaired,
        },
        "models": out_models,
    }


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("torch", "torchmetrics", "transformers", "torch-fidelity", "torchvision", "clear-dit"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------


def _fmt(value: float | None, decimals: int) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{decimals}f}"


def markdown_table(results: dict) -> str:
    """The paper's Table 2 layout: one row per model, the original model first; ``—`` =
    not applicable or not requested, ``n/a`` = unavailable (the reasons are listed below)."""
    models = results["models"]
    columns = [c for c in COLUMNS if c[0] != "rmse_condition" or results["protocol"]["condition_images"]]
    rows = []
    for name, info in models.items():
        cells = [name]
        for key, _, _, _, decimals in columns:
            value, note = info["metrics"].get(key), info["notes"].get(key, "")
            cells.append("—" if value is None and note.startswith(("not applicable", "not requested")) else _fmt(value, decimals))
        rows.append(cells)
    res, images = results["protocol"]["resolution"], results["images"]
    groups = {}
    for _, title, group, _, _ in columns:
        groups.setdefault(group, []).append(title.split(" ")[0] + (" (real)" if group == "vs. real" else ""))
    lines = [
        f"{images['evaluated']} prompts at {res['width']}x{res['height']}; original model: {results['protocol']['original']}. "
        f"Against the original model's images (same prompt, same seed): {', '.join(groups['vs. original'])}. "
        + (f"Against the real images: {', '.join(groups['vs. real'])}. " if "vs. real" in groups else "")
        + "GFLOPs: one attention layer.",
        "",
        "| Method | " + " | ".join(c[1] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    notes = [f"- {name}, {key}: {note}" for name, info in models.items() for key, note in info["notes"].items()
             if not note.startswith(("not applicable", "not requested"))]
    if notes:
        lines += ["", "Unavailable (`n/a`):", *notes]
    return "\n".join(lines) + "\n"


def json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_report(results: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``out_dir/metrics.json`` (strict JSON: infinities as the strings "inf"/"-inf") and
    ``out_dir/table.md``; both written atomically (:mod:`clear.files`)."""
    out_dir = Path(out_dir)
    js = write_text(out_dir / "metrics.json", json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    md = write_text(out_dir / "table.md", markdown_table(results))
    return js, md
