"""Image sets made by a model (not single images: those are :mod:`clear.inference`'s): the one resumable,
sharded, manifest-checked generation loop, where a pipeline draws one image per prompt, for the training set (:func:`generate_dataset`, webdataset tar shards) and for
evaluation sets (:func:`generate_images`, a folder of ``<key>.png``).

The rules both follow:

* **Seeds.** Every item has its own seed, and its image is drawn with a CPU generator
  (``torch.Generator("cpu").manual_seed(seed)``) made for that image alone, so an image
  depends on its prompt, seed and settings only: not on the device (CPU noise is the same on
  every machine), the batch size or which other images share its batch.
* **Settings.** The settings that define the images are recorded in a manifest next to them
  (:func:`record_settings`); resuming with other settings is refused with a message that names
  every difference and the fix, instead of mixing images.
* **Resuming.** Every image is written atomically (:mod:`clear.files`), and items whose output
  exists are skipped, so a killed job is simply started again.
* **Sharding.** Process ``rank`` of ``world`` takes the units with ``index % world == rank``
  (:func:`share`): single images for evaluation sets, whole tar shards for the training set.
* **Progress** is a tqdm bar per process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .data import BadSampleError, read_prompt
from .files import save_image, write_bytes, write_json, write_tar
from .shards import index_samples, split_key

__all__ = ["MANIFEST", "DATA_MANIFEST", "Item", "share", "settings_diff", "record_settings", "run",
           "generate_images", "read_training_prompts", "generate_dataset", "staged_keys"]

MANIFEST = "generation.json"  # an evaluation folder's: {"settings": ..., "items": [{key, prompt, seed}, ...]}
DATA_MANIFEST = ".generation.json"  # a training set's: the settings (its items are in the shards' JSON)


@dataclass(frozen=True)
class Item:
    """One image to make: its key (file name stem), prompt and seed."""

    key: str
    prompt: str
    seed: int


def share(units: Sequence, rank: int, world: int) -> list:
    """The units process ``rank`` of ``world`` makes: those with ``index % world == rank``."""
    if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
        raise ValueError(f"rank {rank} of {world} processes: need 0 <= rank < world (e.g. --shard 0/4 .. 3/4, "
                         "or torchrun's RANK and WORLD_SIZE)")
    return [u for i, u in enumerate(units) if i % world == rank]


def settings_diff(old: dict, new: dict) -> list[str]:
    """``"name: was X, now Y"`` for every setting that differs (a missing one is ``(not set)``)."""
    missing = "(not set)"
    return [f"{k}: was {old.get(k, missing)!r}, now {new.get(k, missing)!r}" for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)]


def record_settings(path: str | os.PathLike, settings: dict, items: Sequence[Item] | None = None) -> dict:
    """Check ``settings`` against the manifest at ``path`` and (re)write it. Raises ``ValueError``
    naming each difference when the folder was made with other settings. With ``items`` the
    manifest is ``{"settings", "items"}`` (an evaluation folder), else the settings alone.
    Returns the settings as JSON gives them back (tuples become lists)."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        old = json.loads(path.read_text())
        old = old["settings"] if items is not None else old
        diff = settings_diff(old, settings)
        if diff:
            raise ValueError(f"{path.parent} holds images made with other settings ({'; '.join(diff)}). Resume with "
                             "the same settings, or use another output folder (or delete this one to start over)")
    content = settings if items is None else {
        "settings": settings, "items": [{"key": it.key, "prompt": it.prompt, "seed": it.seed} for it in items]}
    text = json.dumps(content, indent=1)
    if not path.is_file() or path.read_text().rstrip("\n") != text:
        write_json(path, content, indent=1)
    return settings


def run(pipe, items: Sequence[Item], save: Callable[[Item, Any], None], call: dict, *, batch_size: int = 1,
        progress: bool = True, desc: str = "generating") -> int:
    """Generate ``items`` in batches of ``batch_size``: ``pipe(prompt=[...], generator=[one CPU
    generator per item, seeded with its seed], **call).images``, then ``save(item, image)`` for each.
    Returns the number of images made."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            negative = call.get("negative_prompt")  # one negative prompt for every prompt of the batch
            extra = {"negative_prompt": [negative] * len(batch)} if isinstance(negative, str) else {}
            images = pipe(prompt=[it.prompt for it in batch],
                          generator=[torch.Generator("cpu").manual_seed(it.seed) for it in batch],
                          **{**call, **extra}).images
            for it, image in zip(batch, images):
                save(it, image)
            bar.update(len(batch))
    return len(items)


# ------------------------------------------------------------------------------------------
# evaluation sets: <out_dir>/<key>.png and generation.json
# ------------------------------------------------------------------------------------------

def generate_images(pipe, prompts: Sequence, out_dir: str | os.PathLike, settings: dict, *,
                    height: int, width: int, num_inference_steps: int, guidance_scale: float, base_seed: int = 0,
                    max_sequence_length: int = 512, batch_size: int = 1, shard: tuple[int, int] = (0, 1),
                    progress: bool = True, family=None) -> dict[str, int]:
    """Write ``out_dir/{key}.png`` for every prompt (``.key``/``.text``, e.g.
    :class:`clear.evaluation.Prompt`) with seed ``base_seed + index``, skipping images already
    there. ``shard=(i, n)`` makes only the prompts with ``index % n == i`` (one process per GPU).

    ``settings`` (model, variant, ...) and the sampling arguments go into
    ``out_dir/generation.json`` with every prompt's key and seed; resuming into a folder made
    with other settings fails instead of mixing images. ``family``: the pipeline's
    :class:`clear.families.ModelFamily`, whose :meth:`~clear.families.ModelFamily.guidance_kwargs` turn
    ``guidance_scale`` into the pipeline's arguments (default: ``guidance_scale`` as it is).
    Returns counts: generated, skipped, total."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    guidance = {"guidance_scale": guidance_scale} if family is None else family.guidance_kwargs(guidance_scale)
    call = dict(height=height, width=width, num_inference_steps=num_inference_steps, **guidance,
                max_sequence_length=max_sequence_length)
    items = [Item(p.key, p.text, base_seed + i) for i, p in enumerate(prompts)]
    mine = share(items, *shard)
    record_settings(out_dir / MANIFEST, dict(settings, **call, base_seed=base_seed), items)
    todo = [it for it in mine if not (out_dir / f"{it.key}.png").exists()]
    run(pipe, todo, lambda it, image: save_image(image, out_dir / f"{it.key}.png"), dict(call, output_type="pil"),
        batch_size=batch_size, progress=progress, desc=f"generating {out_dir.name}")
    return {"generated": len(todo), "skipped": len(mine) - len(todo), "total": len(mine)}


# ------------------------------------------------------------------------------------------
# the training set: webdataset shards <output_dir>/shard-xxxxx.tar of <key>.jpg + <key>.json
# ------------------------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z0-9_-]+")


def read_training_prompts(path: str | os.PathLike, base_seed: int = 0) -> tuple[list[Item], list[str]]:
    """The prompts of a ``.txt`` (one per line), ``.jsonl`` (``{"prompt", optional "key" and
    "seed"}``) or text-to-image-2M ``.tar`` file (``<key>.json`` with a ``prompt``), and the
    entries that were unusable. Keys default to the zero-padded index, seeds to ``base_seed + index``."""
    path = Path(path)
    raw, bad = [], []  # (key or None, prompt, seed or None)
    if path.suffix == ".tar":
        for sample in index_samples(path):
            try:
                raw.append((re.sub(r"[^A-Za-z0-9_-]", "_", sample.id), read_prompt(sample), None))
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
                raw.append((key, prompt, None if seed is None else int(seed)))
            except (ValueError, KeyError, TypeError) as e:
                bad.append(f"{path}:{n}: {type(e).__name__}: {e}")
    else:
        raw = [(None, line.strip(), None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [Item(key or f"{i:08d}", prompt, base_seed + i if seed is None else seed)
             for i, (key, prompt, seed) in enumerate(raw)]
    dup = sorted(k for k, n in Counter(it.key for it in items).items() if n > 1)
    if dup:
        raise ValueError(f"{path} gives the same key to several prompts: {', '.join(dup[:5])}; keys must be unique")
    return items, bad


def staged_keys(staging: Path) -> set[str]:
    """Keys whose image and metadata are both staged (the .json is written last)."""
    return {split_key(p.name)[0] for p in staging.glob("*.json")} if staging.is_dir() else set()


def generate_dataset(load_pipe: Callable[[], Any], items: Sequence[Item], output_dir: str | os.PathLike,
                     settings: dict, call: dict, *, samples_per_shard: int, batch_size: int = 1,
                     jpeg_quality: int = 95, meta: dict | None = None, rank: int = 0, world: int = 1,
                     progress: bool = True) -> dict:
    """The training set: shard ``s`` (``output_dir/shard-{s:05d}.tar``) holds ``items[s*N:(s+1)*N]``
    (``N = samples_per_shard``) as ``<key>.jpg`` and ``<key>.json`` (``{"key", "prompt", "seed",
    **meta}``); process ``rank`` of ``world`` makes the shards with ``s % world == rank``.

    Each image is first staged (``output_dir/.staging/shard-xxxxx/``, the ``.json`` after the
    ``.jpg``), and a shard is packed as soon as all of its images are there, so a killed job resumes:
    finished shards and staged images are skipped. ``settings`` (plus a digest of the items) are
    checked against ``output_dir/.generation.json``. ``load_pipe()`` is called only when
    something is left to generate; ``call``: the pipeline's sampling arguments.
    Returns ``{"written", "skipped", "shards"}``."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([[it.key, it.prompt, it.seed] for it in items]).encode()).hexdigest()
    record_settings(output_dir / DATA_MANIFEST, dict(settings, prompts_digest=digest, num_samples=len(items),
                                                     samples_per_shard=samples_per_shard))

    n_shards = -(-len(items) // samples_per_shard)
    shards = {s: (output_dir / f"shard-{s:05d}.tar", output_dir / ".staging" / f"shard-{s:05d}",
                  list(items[s * samples_per_shard:(s + 1) * samples_per_shard]))
              for s in share(range(n_shards), rank, world)}
    todo = []  # (shard, item) not yet staged, in shard order
    for s, (path, staging, shard_items) in shards.items():
        if not path.exists():
            staged = staged_keys(staging)
            todo += [(s, it) for it in shard_items if it.key not in staged]
    done = sum(len(v[2]) for v in shards.values()) - len(todo)
    left = Counter(s for s, _ in todo)

    def pack(s: int) -> None:
        path, staging, shard_items = shards[s]
        write_tar(path, [(it.key, {"jpg": (staging / f"{it.key}.jpg").read_bytes(),
                                   "json": (staging / f"{it.key}.json").read_bytes()}) for it in shard_items])
        shutil.rmtree(staging)

    for s, (path, _, _) in shards.items():
        if not path.exists() and not left[s]:  # staged completely by a killed run
            pack(s)
    if todo:
        shard_of = {it.key: s for s, it in todo}

        def save(it: Item, image) -> None:
            s = shard_of[it.key]
            staging = shards[s][1]
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=jpeg_quality)
            write_bytes(staging / f"{it.key}.jpg", buf.getvalue())
            write_bytes(staging / f"{it.key}.json",
                        json.dumps({"key": it.key, "prompt": it.prompt, "seed": it.seed, **(meta or {})}).encode())
            left[s] -= 1
            if not left[s]:
                pack(s)

        run(load_pipe(), [it for _, it in todo], save, call, batch_size=batch_size, progress=progress,
            desc=f"generate (rank {rank})")
    try:
        (output_dir / ".staging").rmdir()  # only when empty: other ranks may still be staging
    except OSError:
        pass
    return {"written": len(todo), "skipped": done, "shards": [str(v[0]) for v in shards.values()]}
