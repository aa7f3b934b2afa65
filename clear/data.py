"""Training data for distillation: decode samples, cached features, bad-sample accounting.

A sample (see :mod:`clear.shards`) gives a prompt (``<key>.json`` with a ``prompt`` field,
the layout of the self-generated shards and of text-to-image-2M) and an image
(``<key>.jpg``/``.png``/...). Instead of the prompt and the image the model inputs can come
from caches written by ``scripts/cache_prompt_embeds.py`` and ``scripts/cache_latent_codes.py``:
``<cache_dir>/prompt_embeds/<id>.safetensors`` and ``<cache_dir>/latent_codes/<id>.safetensors``.

A sample that cannot be read is never replaced by another one: the dataset returns a
:class:`BadSample` naming it and the reason, ``collate`` leaves it out of the batch, and
:class:`BadSamples` counts and lists it once (however often it is met) for the logs and the end-of-run report.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .files import save_safetensors
from .shards import IMAGE_EXTS, Sample, unsafe_name

PROMPT_EMBEDS = "prompt_embeds"  # cache kind: "prompt_embeds" [L, D] and the family's other text features [...]
LATENT_CODES = "latent_codes"  # cache kind: VAE posterior "latent_mean" and "latent_std" [C, h, w]
logger = logging.getLogger(__name__)
_FEATURE_NAMES = {PROMPT_EMBEDS: ("prompt_embeds", "pooled_prompt_embeds"), LATENT_CODES: ("latent_mean", "latent_std")}


class BadSampleError(Exception):
    """A sample that cannot be used; the message says why."""


@dataclass(frozen=True)
class BadSample:
    id: str
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass
class BadSamples:
    """The distinct samples that were skipped, by kind of failure.

    A bad file met again (the next epoch, another batch) is not counted again: ``len`` is the
    number of distinct samples, ``encounters`` how often one was skipped, and the list (which
    goes into every checkpoint) stays as long as the number of bad files."""

    items: list = field(default_factory=list)
    encounters: int = 0

    def add(self, bad: BadSample | list) -> list[BadSample]:
        """Record ``bad`` (one or a list); returns those not seen before (to log them once)."""
        bad = [bad] if isinstance(bad, BadSample) else list(bad)
        self.encounters += len(bad)
        seen, new = {b.id for b in self.items}, []
        for b in bad:
            if b.id not in seen:
                seen.add(b.id)
                new.append(b)
        self.items.extend(new)
        return new

    def ids(self) -> list[str]:
        return [b.id for b in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        return dict(Counter(b.kind for b in self.items))

    def report(self, limit: int = 20) -> str:
        if not self.items:
            return "no bad samples"
        again = f" ({self.encounters} times in all)" if self.encounters > len(self.items) else ""
        lines = [f"skipped {len(self.items)} bad sample(s){again}: "
                 + ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))]
        lines += [f"  {b.id}: {b.reason}" for b in self.items[:limit]]
        if len(self.items) > limit:
            lines.append(f"  ... and {len(self.items) - limit} more")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {"items": [[b.id, b.reason] for b in self.items], "encounters": self.encounters}

    def load_state_dict(self, state: dict) -> None:
        self.items, self.encounters = [], 0
        self.add([BadSample(i, r) for i, r in state["items"]])  # (older checkpoints may list a file repeatedly)
        self.encounters = state.get("encounters", self.encounters)


# ------------------------------------------------------------------------------------------
# decoding one sample
# ------------------------------------------------------------------------------------------

def read_prompt(sample: Sample) -> str:
    if "json" not in sample.files:
        raise BadSampleError(f"no json: {sample.id} has no .json with the prompt")
    try:
        meta = json.loads(sample.read("json").decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSampleError(f"bad json: {e}") from e
    prompt = meta.get("prompt") if isinstance(meta, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadSampleError("bad json: no non-empty 'prompt' field")
    return prompt


def image_ext(sample: Sample) -> str:
    for ext in IMAGE_EXTS:
        if ext in sample.files:
            return ext
    raise BadSampleError(f"no image: {sample.id} has none of .{', .'.join(IMAGE_EXTS)}")


def image_to_tensor(image, resolution: int) -> torch.Tensor:
    """PIL image -> ``[3, resolution, resolution]`` in ``[-1, 1]``: shorter side resized to
    ``resolution`` (bicubic), then centre-cropped."""
    from PIL import Image  # here: PIL loads after --help

    image = image.convert("RGB")
    w, h = image.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float().div(127.5).sub(1.0)


def read_image(sample: Sample, resolution: int) -> torch.Tensor:
    from PIL import Image  # here: PIL loads after --help

    ext = image_ext(sample)
    try:
        with Image.open(io.BytesIO(sample.read(ext))) as im:
            im.load()
            return image_to_tensor(im, resolution)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # unidentified, truncated, bad header
        raise BadSampleError(f"bad image: cannot decode {sample.id}.{ext} ({e})") from e


# ------------------------------------------------------------------------------------------
# feature caches
# ------------------------------------------------------------------------------------------

def default_cache_dir(data_root: str | os.PathLike) -> Path:
    """Caches live next to the data: ``data/t2i`` -> ``data/t2i_cache``, ``x/shard.tar`` -> ``x/shard_cache``."""
    root = Path(data_root).resolve()
    name = root.name[: -len(".tar")] if root.name.endswith(".tar") else root.name
    return root.parent / f"{name}_cache"


def feature_path(cache_dir: str | os.PathLike, kind: str, sample_id: str) -> Path:
    """``<cache_dir>/<kind>/<sample_id>.safetensors``; a ``ValueError`` for an id that could lead outside
    ``<cache_dir>/<kind>`` (absolute, ``..``, empty: :func:`clear.shards.unsafe_name`), which
    :func:`clear.shards.index_samples` never gives."""
    why = "an empty name" if not sample_id.strip("./") else unsafe_name(sample_id)
    if why is not None:
        raise ValueError(f"sample id {sample_id!r} cannot be a cache file name: it is {why} and would be written "
                         f"outside {Path(cache_dir) / kind}; index the data with clear.shards.index_samples")
    return Path(cache_dir) / kind / f"{sample_id}.safetensors"


def load_features(cache_dir: str | os.PathLike, kind: str, sample_id: str,
                  names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The cached tensors ``names`` of one sample (default: the kind's, FLUX.1 / SD3 prompt embeddings or latent
    codes; a family's :attr:`clear.families.ModelFamily.prompt_features` for its prompt cache)."""
    names = names or _FEATURE_NAMES[kind]
    path = feature_path(cache_dir, kind, sample_id)
    if not path.is_file():
        raise BadSampleError(f"not cached: no {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise BadSampleError(f"bad cache: cannot read {path} ({e}); delete it and re-run the cache script") from e
    missing = [n for n in names if n not in tensors]
    if missing:
        raise BadSampleError(f"bad cache: {path} lacks {', '.join(missing)}; delete it and re-run the cache script")
    for n in names:  # a NaN here would reach the loss and read as divergence
        t = tensors[n]
        bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
        if bad:
            raise BadSampleError(f"bad cache: {path} holds {bad} NaN or infinite values in {n}; delete it and re-run "
                                 "the cache script")
    return {n: tensors[n] for n in names}


def check_cache(cache_dir: str | os.PathLike, kind: str, family: str | None = None, **settings) -> None:
    """Fail early, with the command to run, when a cache that the run relies on is absent, or
    (``family``: ``"flux"``, ``"sd3"``) was made with another model family's encoders, or with
    other ``settings`` than the run's (``max_sequence_length`` of prompt embeddings, ``resolution``
    of latent codes: each compared with what the cache script recorded in the file's metadata)."""
    folder = Path(cache_dir) / kind
    first = next(folder.rglob("*.safetensors"), None) if folder.is_dir() else None
    script = "cache_prompt_embeds" if kind == PROMPT_EMBEDS else "cache_latent_codes"
    if first is None:
        raise FileNotFoundError(f"no cached {kind} in {folder}: run scripts/{script}.py (or {script}.sh) with the same "
                                "--data_root and --cache_dir first, or train without the --use_cached_* flag")
    if family is None and not settings:
        return

    try:
        with safe_open(str(first), framework="pt") as f:
            recorded = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged file is reported when its sample is read
        recorded = {}
    made_for = recorded.get("family")
    if family is not None and made_for is not None and made_for != family:
        raise ValueError(f"the cached {kind} in {folder} were made with a {made_for} model's encoders, but this "
                         f"run trains a {family} model: run scripts/{script}.py with this model into another "
                         "--cache_dir and pass that")
    for name, value in settings.items():
        if value is not None and name in recorded and recorded[name] != str(value):
            raise ValueError(f"the cached {kind} in {folder} were made with --{name} {recorded[name]}, but this run "
                             f"uses {value}: pass --{name} {recorded[name]}, or re-run scripts/{script}.py with "
                             f"--{name} {value} into another --cache_dir and pass that")


# ------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------

class DistillDataset(Dataset):
    """Items are dicts with ``id`` and either ``prompt`` or the cached ``prompt_features`` (default
    ``prompt_embeds`` + ``pooled_prompt_embeds``; the family's :attr:`clear.families.ModelFamily.prompt_features`),
    and either ``image`` or ``latent_mean`` + ``latent_std``; or a :class:`BadSample` when the sample cannot be used."""

    def __init__(self, samples: list[Sample], resolution: int, cache_dir=None, cached_prompts: bool = False,
                 cached_latents: bool = False, prompt_features: tuple[str, ...] | None = None):
        if not samples:
            raise ValueError("the dataset is empty: the data root holds no samples (<key>.jpg + <key>.json, in .tar "
                             "shards or loose)")
        if (cached_prompts or cached_latents) and cache_dir is None:
            raise ValueError("cached features need a cache_dir")
        self.samples, self.resolution, self.cache_dir = samples, resolution, cache_dir
        self.cached_prompts, self.cached_latents = cached_prompts, cached_latents
        self.prompt_features = prompt_features or _FEATURE_NAMES[PROMPT_EMBEDS]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        try:
            item = {"id": sample.id}
            if self.cached_prompts:
                item.update(load_features(self.cache_dir, PROMPT_EMBEDS, sample.id, self.prompt_features))
            else:
                item["prompt"] = read_prompt(sample)
            if self.cached_latents:
                item.update(load_features(self.cache_dir, LATENT_CODES, sample.id))
            else:
                item["image"] = read_image(sample, self.resolution)
            return item
        except BadSampleError as e:
            return BadSample(sample.id, str(e))


def collate(items: list) -> dict:
    """Stack the good items; bad ones go to ``batch["bad"]``. An all-bad batch has ``ids == []``."""
    good = [x for x in items if not isinstance(x, BadSample)]
    batch = {"ids": [x["id"] for x in good], "bad": [x for x in items if isinstance(x, BadSample)]}
    if not good:
        return batch
    for name in good[0]:
        if name == "id":
            continue
        values = [x[name] for x in good]
        if name == "prompt":
            batch[name] = values
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"samples {batch['ids']} have {name} of different shapes {sorted(shapes)}: the caches "
                             "were made with different settings (--resolution / --max_sequence_length); re-run "
                             "the cache script into an empty --cache_dir")
        batch[name] = torch.stack(values)
    return batch


class RankSampler(Sampler):
    """An endless, resumable stream of sample indices for one rank.

    Epoch ``e`` is a permutation seeded by ``seed + e``; the first ``n - n % world`` entries
    are dealt out round-robin, so every rank sees the same number of samples per epoch and
    no sample twice in an epoch. ``start`` is the number of indices this rank has already
    consumed (the data position saved in checkpoints)."""

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} processes")
        self.n, self.seed, self.rank, self.world, self.start = num_samples, seed, rank, world_size, start
        self.per_rank = num_samples // world_size

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        return perm[self.rank :: self.world].tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_indices(epoch)[offset:]
            epoch, offset = epoch + 1, 0


class TrainingBatches:
    """One process's stream of training batches: ``dataset`` in :class:`RankSampler` order from
    ``state["samples_drawn"]`` on (0: a new run), through :func:`collate`. ``next()`` returns the
    next batch with at least one readable sample; unreadable ones are counted in ``bad`` and
    logged once each. :meth:`state_dict` is the data position a checkpoint keeps."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, state: dict | None = None, log: logging.Logger | None = None):
        self.dataset, self.batch_size, self.log = dataset, batch_size, log or logger
        self.bad, self.samples_drawn = BadSamples(), 0
        if state is not None:
            self.samples_drawn = state["samples_drawn"]
            self.bad.load_state_dict(state["bad_samples"])
        sampler = RankSampler(len(dataset), seed, rank, world_size, start=self.samples_drawn)
        self._batches = iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                        num_workers=num_workers, pin_memory=torch.cuda.is_available()))

    def next(self) -> dict:
        for _ in range(math.ceil(len(self.dataset) / self.batch_size) + 1):
            batch = next(self._batches)
            self.samples_drawn += self.batch_size
            for b in self.bad.add(batch["bad"]):  # each bad file is logged once, when first met
                self.log.warning("skipping bad sample %s: %s", b.id, b.reason)
            if batch["ids"]:
                return batch
        raise RuntimeError(f"no sample of a whole epoch could be read:\n{self.bad.report()}")

    def state_dict(self) -> dict:
        return {"samples_drawn": self.samples_drawn, "bad_samples": self.bad.state_dict()}


# ------------------------------------------------------------------------------------------
# writing a feature cache
# ------------------------------------------------------------------------------------------

@dataclass
class CacheReport:
    written: int = 0
    already_cached: int = 0
    bad: BadSamples = field(default_factory=BadSamples)

    def summary(self, kind: str, rank: int = 0, world_size: int = 1) -> str:
        return (f"rank {rank}/{world_size}: {self.written} {kind} written, {self.already_cached} already cached\n"
                + self.bad.report(limit=10**9))


def write_feature_cache(samples: list[Sample], kind: str, cache_dir, read, encode, batch_size: int = 8,
                        rank: int = 0, world_size: int = 1, metadata: dict | None = None,
                        progress: bool = True) -> CacheReport:
    """Cache features for this rank's share of ``samples`` (every ``world_size``-th, from
    ``rank``) that have no cache file yet.

    ``read(sample)`` returns the encoder's input for one sample or raises
    :class:`BadSampleError` (the sample is then skipped, counted and listed);
    ``encode(inputs)`` maps a list of inputs to ``{name: tensor [len(inputs), ...]}``.
    Every sample's features go to ``<cache_dir>/<kind>/<id>.safetensors``, written atomically."""
    report = CacheReport()
    mine = samples[rank::world_size]
    todo = [s for s in mine if not feature_path(cache_dir, kind, s.id).is_file()]
    report.already_cached = len(mine) - len(todo)
    bar = tqdm(total=len(todo), desc=f"{kind} (rank {rank})", disable=not progress)
    for start in range(0, len(todo), batch_size):
        ids, inputs = [], []
        for sample in todo[start: start + batch_size]:
            try:
                inputs.append(read(sample))
                ids.append(sample.id)
            except BadSampleError as e:
                report.bad.add(BadSample(sample.id, str(e)))
        if inputs:
            features = encode(inputs)
            for j, sid in enumerate(ids):
                save_safetensors({n: t[j] for n, t in features.items()}, feature_path(cache_dir, kind, sid),
                                        metadata={k: str(v) for k, v in (metadata or {}).items()})
            report.written += len(ids)
        bar.update(min(batch_size, len(todo) - start))
    bar.close()
    return report
