"""The paper's high-resolution path on the mini teacher: an SDEdit cascade 64 -> 128 -> 256 -> 512 px
(16² -> 128² image tokens), each stage from the previous stage's image, for the teacher (full attention),
CLEAR r = 4 zero-shot, distilled and distilled with df = 2, all from the teacher's 64 px image with the
same seeds; with the speed of one transformer forward against the number of tokens.

    python scripts/mini.py highres            # 4 held-out prompts to 512 px
    python scripts/mini.py highres --quick    # 1 prompt to 192 px (what the tests run)
    python scripts/mini.py highres --tune     # the teacher's cascade settings, measured (tune.json)

:func:`run` takes :class:`HighresSettings` (:func:`make_settings` builds them from the defaults, the
reduced run and overrides); scripts/mini.py is the command line. The distilled students are the base run's
(``<out>/work/distill``, from ``python scripts/mini.py``; trained first by that run when absent).

Per stage and variant (``<out>/highres/``: ``report.md``, ``metrics.json``, ``grid_<size>.png``,
``speed.png``, the images under ``images/<variant>/<size>/``): PSNR, SSIM and MS-SSIM (5 scales: defined
above 160 px a side) to the teacher's image at that stage, kind accuracy, placement and background
(:func:`clear.mini.scenes.score_parts`; the score's controls at 64 px and at the top size are in the
report), PSNR to the stage's input (the 64 px image resized: how much the cascade keeps), seconds per
image and per transformer forward, the peak resident memory during the stage, and attention FLOPs per
forward (:func:`clear.geometry.attention_flops`, every block). The speed sweep times one transformer
forward per size for the teacher, for CLEAR (``backend``, ``auto`` by default: whatever the machine's
fastest registered backend is) and for the teacher with its attention core removed (the floor attention
cannot go below); at the cascade's sizes the times are the cascade's own forwards (median).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clear.defaults import VAE_TILING_LATENTS
from clear.files import write_text

from . import scenes as S
from . import teacher as T

logger = logging.getLogger("clear.mini.highres")

BASE = T.SIZE  # the cascade starts from the teacher's image at its training size
CONTROL_SCENES = 50  # held-out scenes the score's controls are measured on (at 64 px and the top size)


@dataclass(frozen=True)
class HighresSettings:
    """Everything that defines a cascade run. ``quick()`` is the reduced run the tests use. ``strength``
    and ``upscale_steps`` are per stage (``int(upscale_steps * strength)`` denoising steps run); the
    teacher's cascade settings (``strength``, ``proportional``, ``ntk_factor``, ``shift``) are the best
    measured by ``--tune`` (docs/mini.md); every variant runs the same settings."""

    model: str
    out: Path = Path("outputs/mini")  # the base run's folder (its distilled weights); results under out/highres
    sizes: tuple[int, ...] = (128, 256, 512)
    prompts: int = 4
    base_steps: int = T.STEPS  # the 64 px image
    upscale_steps: tuple[int, ...] = (10, 10, 10)
    strength: tuple[float, ...] = (0.4, 0.4, 0.4)
    proportional: bool = False  # the proportional attention scale, L0 = the mini's training length (288)
    ntk_factor: float = 1.0  # NTK-scaled RoPE factor (1: the model's own RoPE)
    shift: float | None = 1.0  # a fixed scheduler shift (None: the scheduler's dynamic shift); 1: no shift
    lowres_guidance: float = 0.0  # I-Max's projected flow toward each stage's input (clear.inference.upscale)
    vae_tiling_latents: int = VAE_TILING_LATENTS  # diffusers' VAE tiling from this many latent cells (0: always)
    radius: int = 4
    down_factor: int = 2
    backend: str = "auto"  # CLEAR's attention backend (clear.backends.choices())
    speed_sizes: tuple[int, ...] = (64, 128, 256, 512)  # sizes of the per-forward speed sweep
    seed: int = 0
    threads: int = 0  # 0: all cores, or 1 when other processes keep them busy
    quick: bool = False

    def __post_init__(self):
        n = len(self.sizes)
        if len(self.strength) != n or len(self.upscale_steps) != n:
            raise ValueError(f"strength {self.strength} and upscale_steps {self.upscale_steps} need one value per "
                             f"stage ({n} sizes: {self.sizes})")
        if list(self.sizes) != sorted(self.sizes) or self.sizes[0] <= BASE:
            raise ValueError(f"sizes {self.sizes} must grow from above the base size {BASE}")
        for k, st in zip(self.upscale_steps, self.strength):
            if not 0 < st <= 1 or int(k * st) < 1:
                raise ValueError(f"strength {st} with {k} steps runs no step: raise either")

    @property
    def dir(self) -> Path:
        return Path(self.out) / "highres"

    def recipe_settings(self):
        from . import recipe

        return recipe.make_settings(quick=self.quick, model=self.model, out=self.out, seed=self.seed,
                                    threads=self.threads or None, radius=self.radius, down_factor=self.down_factor)

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


QUICK = dict(sizes=(128, 192), prompts=1, upscale_steps=(10, 10), strength=(0.4, 0.4), speed_sizes=(64, 128, 192))


def make_settings(*, quick: bool = False, model: str | None = None, out=HighresSettings.out,
                  **overrides) -> HighresSettings:
    """The defaults, or with ``quick`` the reduced run (:data:`QUICK`), then ``overrides`` (``None`` keeps)."""
    chosen = dict(QUICK, quick=True) if quick else {}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return HighresSettings(model=model or str(T.MINI_DIR), out=Path(out), **chosen)


# ------------------------------------------------------------------------------------------
# Measuring: forwards, memory
# ------------------------------------------------------------------------------------------

PHASES = ("text", "denoise", "vae_encode", "vae_decode")  # the parts of one image's time (PhaseTimer)


class PhaseTimer:
    """Where a pipeline call's time goes: the text encoders (forward hooks on ``text_encoder``,
    ``text_encoder_2``, ``text_encoder_3``, those the pipeline has), the VAE's ``encode`` and ``decode``
    (wrapped on the VAE instance, which the img2img pipeline shares), and the rest (:meth:`take`: the call's
    seconds less those; the transformer's forwards and the scheduler)."""

    def __init__(self, pipe):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._handles, self._wrapped = [], []
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                start = {}
                self._handles += [
                    module.register_forward_pre_hook(lambda *_, t=start: t.update(t0=time.perf_counter())),
                    module.register_forward_hook(lambda *_, t=start: self._add("text", t["t0"]))]
        self.vae = pipe.vae
        for phase, method in (("vae_encode", "encode"), ("vae_decode", "decode")):
            setattr(self.vae, method, self._timed(getattr(self.vae, method), phase))
            self._wrapped.append(method)

    def _add(self, phase: str, t0: float) -> None:
        self.seconds[phase] += time.perf_counter() - t0

    def _timed(self, fn, phase: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(phase, t0)
        return timed

    def take(self, total: float) -> dict:
        """``{phase: seconds}`` since the last take; ``denoise``: ``total`` (the call's seconds) less the others."""
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        out["denoise"] = total - sum(v for k, v in out.items() if k != "denoise")
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for method in self._wrapped:
            delattr(self.vae, method)  # the instance attribute: the class's method again


class ForwardTimer:
    """Wall time of every forward of ``module`` (hooks; :meth:`take` returns and clears them)."""

    def __init__(self, module):
        self.times: list[float] = []
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.times.append(time.perf_counter() - self._t0)

    def take(self) -> list[float]:
        out, self.times = self.times, []
        return out

    def close(self):
        for h in self._handles:
            h.remove()


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_rss(interval: float = 0.02):
    """Within the block, the largest resident memory seen (sampled every ``interval`` s): ``box["peak"]``."""
    box = {"peak": rss_bytes()}
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            box["peak"] = max(box["peak"], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box["peak"] = max(box["peak"], rss_bytes())


@contextlib.contextmanager
def no_attention_core():
    """Within the block, FLUX's attention processors skip the attention itself (the output is the values):
    what a forward costs without attention, the floor any attention backend adds to."""
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.dispatch_attention_fn
    transformer_flux.dispatch_attention_fn = lambda query, key, value, **kwargs: value
    try:
        yield
    finally:
        transformer_flux.dispatch_attention_fn = original


@torch.no_grad()
def forward_seconds(model, size: int, pixels_per_token: int, text_len: int, repeats: int = 1) -> float:
    """Seconds of one forward of ``model`` at ``size`` px a side (after one untimed forward), the fastest of
    ``repeats``."""
    from .measure import _forward_inputs

    inputs = _forward_inputs(model, size, pixels_per_token, text_len)
    model(**inputs)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs)
        best = min(best, time.perf_counter() - t0)
    return best


def attention_gflops(config, size: int, pixels_per_token: int, text_len: int, radius: float | None,
                     down_factor: int = 1) -> float:
    """Attention GFLOPs of one forward (every double and single block) at ``size`` px a side."""
    from clear.geometry import attention_flops

    grid = size // pixels_per_token
    per_layer = attention_flops(grid, grid, radius, text_len=text_len, down_factor=down_factor,
                                dim=config.num_attention_heads * config.attention_head_dim)
    return per_layer * (config.num_layers + config.num_single_layers) / 1e9


# ------------------------------------------------------------------------------------------
# Image metrics
# ------------------------------------------------------------------------------------------

def _tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


MS_SSIM_MIN = 161  # MS-SSIM (5 scales, an 11-pixel window) needs more than 160 px a side


def pair_metrics(image, reference) -> dict:
    """PSNR, SSIM and (from :data:`MS_SSIM_MIN` px) MS-SSIM of ``image`` to ``reference``, in [0, 1] pixels
    (torchmetrics, as ``scripts/evaluate.py``)."""
    from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                               peak_signal_noise_ratio, structural_similarity_index_measure)

    a, b = _tensor(image), _tensor(reference)
    out = {"psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
           "ssim": float(structural_similarity_index_measure(a, b, data_range=1.0)), "ms_ssim": None}
    if min(image.size) >= MS_SSIM_MIN:
        out["ms_ssim"] = float(multiscale_structural_similarity_index_measure(a, b, data_range=1.0))
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ------------------------------------------------------------------------------------------
# The cascade
# ------------------------------------------------------------------------------------------

def variants(s: HighresSettings) -> list:
    from .recipe import Settings

    return Settings(model=s.model, radius=s.radius, down_factor=s.down_factor).variants()


def student_weights(s: HighresSettings) -> dict:
    """The base run's distilled weights by variant key; the base run (``python scripts/mini.py``, or its
    ``--quick`` run for a quick cascade) trains them first when one is absent."""
    from . import recipe

    rs = s.recipe_settings()

    def paths():
        return {v.key: rs.work / "distill" / v.key / f"{v.weights_name()}.safetensors" for v in rs.variants()
                if v.trained}

    if not all(p.is_file() for p in paths().values()):
        logger.info("no distilled weights under %s: running the base recipe first", rs.work / "distill")
        recipe.run(rs)
    return paths()


def cascade_settings(s: HighresSettings, stage: int) -> dict:
    return dict(strength=s.strength[stage], steps=s.upscale_steps[stage], ntk_factor=s.ntk_factor,
                proportional=s.proportional, shift=s.shift, lowres_guidance=s.lowres_guidance, tiling=None,
                tiling_latents=s.vae_tiling_latents)


def run_cascade(pipe, s: HighresSettings, scenes: list, bases: dict, folder: Path, seeds: list[int],
                pixels_per_token: int, progress: bool = True) -> dict:
    """Every scene's base image through the stages with ``pipe`` as it is (teacher or CLEAR): images under
    ``folder/<size>/<key>.png``; per stage ``{"seconds", "forward_seconds", "forwards", "peak_rss_mb"}`` and
    the images ``{size: {key: image}}``. Each size is warmed up once (an untimed forward: compilation,
    caches) before its timed stages."""
    import clear.inference as inf
    from tqdm.auto import tqdm

    from .measure import _forward_inputs

    timer, phases = ForwardTimer(pipe.transformer), PhaseTimer(pipe)
    images = {BASE: dict(bases)}
    stats = {}
    try:
        for i, size in enumerate(s.sizes):
            with torch.no_grad():
                pipe.transformer(**_forward_inputs(pipe.transformer, size, pixels_per_token, T.MAX_SEQUENCE_LENGTH))
            timer.take()
            seconds, forwards, split = [], [], []
            images[size] = {}
            prev = s.sizes[i - 1] if i else BASE
            with peak_rss() as mem:
                for j, sc in enumerate(tqdm(scenes, desc=f"{folder.name} {size}px", unit="img", disable=not progress)):
                    key = f"h{j:04d}"
                    res = inf.upscale(pipe, images[prev][key], S.caption(sc), size, size, seed=seeds[j],
                                      max_sequence_length=T.MAX_SEQUENCE_LENGTH, **cascade_settings(s, i))
                    inf.save_png(res.image, folder / str(size) / f"{key}.png", res.settings)
                    images[size][key] = res.image
                    seconds.append(res.seconds)
                    forwards += timer.take()
                    split.append(phases.take(res.seconds))
            stats[size] = {"seconds": float(np.mean(seconds)), "forward_seconds": float(np.median(forwards)),
                           "forwards": len(forwards) / len(scenes), "peak_rss_mb": mem["peak"] / 2**20,
                           **{f"{p}_seconds": float(np.mean([t[p] for t in split])) for p in PHASES},
                           "vae_tiling": bool(res.settings["vae_tiling"])}
    finally:
        timer.close()
        phases.close()
    return {"stats": stats, "images": images}


def speed_sweep(s: HighresSettings, teacher, pixels_per_token: int, measured: dict | None = None) -> dict:
    """Seconds per transformer forward by size: the teacher, CLEAR r (zero-shot weights: the same cost as
    distilled), CLEAR r with df, and the teacher without its attention core (the floor). ``measured``:
    ``{row: {size: seconds}}`` already timed (the cascade's forwards), not timed again."""
    from .measure import load_transformer

    measured = measured or {}
    rows = {"teacher": {}, "clear": {}, f"clear_df{s.down_factor}": {}, "floor": {}}
    windows = {"teacher": None, "clear": 1, f"clear_df{s.down_factor}": s.down_factor}
    models = {"teacher": teacher}
    for size in s.speed_sizes:
        for name, df in windows.items():
            if size in measured.get(name, {}):
                rows[name][size] = measured[name][size]
                continue
            if name not in models:
                models[name] = load_transformer(s.model, s.radius, df, backend=s.backend, base=teacher)
            rows[name][size] = forward_seconds(models[name], size, pixels_per_token, T.MAX_SEQUENCE_LENGTH)
        with no_attention_core():
            rows["floor"][size] = forward_seconds(teacher, size, pixels_per_token, T.MAX_SEQUENCE_LENGTH)
        logger.info("forward at %d px: %s", size, {k: round(v[size], 3) for k, v in rows.items()})
    return rows


def base_images(pipe, s: HighresSettings, scenes: list, seeds: list[int], folder: Path) -> dict:
    import clear.inference as inf

    out = {}
    for j, (sc, seed) in enumerate(zip(scenes, seeds)):
        res = inf.generate(pipe, S.caption(sc), BASE, BASE, steps=s.base_steps, seed=seed,
                           max_sequence_length=T.MAX_SEQUENCE_LENGTH)
        inf.save_png(res.image, folder / f"h{j:04d}.png", res.settings)
        out[f"h{j:04d}"] = res.image
    return out


def stage_metrics(s: HighresSettings, scenes: list, images: dict, teacher_images: dict) -> dict:
    """Per size: the score of the scenes (:func:`clear.mini.scenes.score_images`: kind accuracy and placement
    pooled over the named shapes, background), PSNR to the stage's input (the previous image resized) and,
    against the teacher's image at that size, PSNR / SSIM / MS-SSIM (means over the images)."""
    from PIL import Image

    out = {}
    sizes = [BASE, *s.sizes]
    for i, size in enumerate(sizes):
        rows = []
        keys = [f"h{j:04d}" for j in range(len(scenes))]
        scored = S.score_images([images[size][key] for key in keys], scenes)
        for j, key in enumerate(keys):
            im = images[size][key]
            row = {}
            if i:
                src = images[sizes[i - 1]][key].convert("RGB").resize((size, size), Image.LANCZOS)
                row["psnr_to_input"] = pair_metrics(im, src)["psnr"]
                base_up = images[BASE][key].convert("RGB").resize((size, size), Image.LANCZOS)
                row["ms_ssim_to_base"] = pair_metrics(im, base_up)["ms_ssim"]
            if teacher_images is not images:
                row.update(pair_metrics(im, teacher_images[size][key]))
            rows.append(row)
        out[size] = {k: _mean([r.get(k) for r in rows]) for k in rows[0]}
        out[size].update({k: scored[k] for k in ("kind_accuracy", "placement", "background")})
        out[size]["per_image_kind_accuracy"] = [p["kind_accuracy"] for p in scored["per_image"]]
    return out


def run(s: HighresSettings, command: str = "") -> dict:
    """The cascade for every variant, the speed sweep, the metrics, the report; returns metrics.json's dict."""
    import clear.inference as inf

    from . import recipe
    from .measure import load_transformer

    recipe.check_teacher(s.model)
    t_start = time.perf_counter()
    torch.set_num_threads(recipe.choose_threads(s.threads))
    weights = student_weights(s)
    rs = s.recipe_settings()
    scenes = S.held_out_scenes(s.prompts, seed=s.seed)
    seeds = [recipe.eval_seed(rs) + j for j in range(s.prompts)]
    pixels_per_token = inf.size_multiple(s.model)
    vs = variants(s)
    results, step_seconds = {}, {}
    t0 = time.perf_counter()
    pipe = inf.load_pipeline(s.model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    bases = base_images(pipe, s, scenes, seeds, s.dir / "images" / "teacher" / str(BASE))
    step_seconds["base images"] = time.perf_counter() - t0
    for v in vs:
        t0 = time.perf_counter()
        if v.radius is not None:
            pipe = inf.load_pipeline(s.model, device="cpu", dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            inf.apply_to_pipeline(pipe, v.radius, v.down_factor, weights.get(v.key) if v.trained else None,
                                  backend=s.backend)
        results[v.key] = run_cascade(pipe, s, scenes, bases, s.dir / "images" / v.key, seeds, pixels_per_token)
        step_seconds[f"cascade {v.key}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = load_transformer(s.model)
    measured = {row: {size: results[key]["stats"][size]["forward_seconds"] for size in s.sizes}
                for row, key in (("teacher", "teacher"), ("clear", "zero_shot"),
                                 (f"clear_df{s.down_factor}", f"distilled_df{s.down_factor}"))}
    speed = speed_sweep(s, teacher, pixels_per_token, measured)
    step_seconds["speed sweep"] = time.perf_counter() - t0

    teacher_images = results["teacher"]["images"]
    cfg = teacher.config
    tables = {}
    for v in vs:
        m = stage_metrics(s, scenes, results[v.key]["images"], teacher_images)
        for size in s.sizes:
            m[size].update(results[v.key]["stats"][size])
            m[size]["attention_gflops"] = attention_gflops(cfg, size, pixels_per_token, T.MAX_SEQUENCE_LENGTH,
                                                           v.radius, v.down_factor if v.radius else 1)
        tables[v.key] = {"label": v.label, "stages": {str(k): val for k, val in m.items()}}
    t0 = time.perf_counter()
    controls = {str(size): S.controls(n=CONTROL_SCENES, seed=s.seed + 1, size=size) for size in (BASE, s.sizes[-1])}
    step_seconds["score controls"] = time.perf_counter() - t0
    from . import highres_report

    metrics = highres_report.collect(s, vs, tables, speed, step_seconds, controls=controls, command=command,
                                     machine=recipe.machine(), wall_seconds=time.perf_counter() - t_start,
                                     pixels_per_token=pixels_per_token, scenes=scenes)
    highres_report.write_all(s, metrics, vs, results, scenes)
    return metrics


# ------------------------------------------------------------------------------------------
# Tuning the teacher's cascade
# ------------------------------------------------------------------------------------------

TUNE_GRID = (  # one setting changed at a time from the settings given (the defaults: the base run's 2x settings)
    dict(),
    dict(strength=0.3), dict(strength=0.55), dict(strength=0.7),
    dict(proportional=True),
    dict(ntk_factor=2.0), dict(ntk_factor=4.0),
    dict(shift=1.0), dict(shift=3.0),
    dict(lowres_guidance=0.5), dict(lowres_guidance=1.0),
)


def tune(s: HighresSettings, grid=TUNE_GRID, command: str = "") -> dict:
    """The teacher's cascade under each setting of ``grid`` (one change at a time from ``s``'s, the same
    strength at every stage): kind accuracy and placement per stage and MS-SSIM of the top stage to the
    resized 64 px image; written to ``<out>/highres/tune.json``. The best keeps the most kind accuracy at
    the top stage (ties: the most placement, then the most MS-SSIM to the base image)."""
    import clear.inference as inf

    from . import recipe

    recipe.check_teacher(s.model)
    torch.set_num_threads(recipe.choose_threads(s.threads))
    rs = s.recipe_settings()
    scenes = S.held_out_scenes(s.prompts, seed=s.seed)
    seeds = [recipe.eval_seed(rs) + j for j in range(s.prompts)]
    pixels_per_token = inf.size_multiple(s.model)
    pipe = inf.load_pipeline(s.model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    bases = base_images(pipe, s, scenes, seeds, s.dir / "tune" / "base")
    rows = []
    for change in grid:
        over = dict(change)
        if "strength" in over:
            over["strength"] = (over["strength"],) * len(s.sizes)
        ts = dataclasses.replace(s, **over)
        name = ",".join(f"{k}={v}" for k, v in change.items()) or "baseline"
        t0 = time.perf_counter()
        res = run_cascade(pipe, ts, scenes, bases, s.dir / "tune" / name.replace("=", "_"), seeds, pixels_per_token,
                          progress=False)
        m = stage_metrics(ts, scenes, res["images"], res["images"])
        top = m[s.sizes[-1]]
        rows.append({"setting": name, "change": change, "seconds": time.perf_counter() - t0,
                     "kind_accuracy": {str(k): v["kind_accuracy"] for k, v in m.items()},
                     "placement": {str(k): v["placement"] for k, v in m.items()},
                     "top_ms_ssim_to_base": top.get("ms_ssim_to_base"), "top_psnr_to_input": top.get("psnr_to_input")})
        logger.info("tune %s: kind accuracy %s", name, rows[-1]["kind_accuracy"])
    top = str(s.sizes[-1])
    best = max(rows, key=lambda r: (round(r["kind_accuracy"][top], 3), round(r["placement"][top], 3),
                                    r["top_ms_ssim_to_base"] or 0))
    out = {"command": command, "settings": s.as_dict(), "rows": rows, "best": best["setting"],
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text(s.dir / "tune.json", json.dumps(out, indent=1, default=str))
    return out

