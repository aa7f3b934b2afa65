"""The paper's recipe on the mini teacher, on a CPU, through the project's own entry points.

    python scripts/mini.py               # the full run (<= 15 minutes on 2 CPU cores)
    python scripts/mini.py --quick       # a reduced run (fewer samples and steps; what the tests run)

:func:`run` takes the :class:`Settings` (:func:`make_settings` builds them from the defaults, the reduced run
and overrides); scripts/mini.py is the command line.

Steps, in order (every one resumable: re-run the same command after an interruption):

1. prompts: training captions (:func:`clear.mini.scenes.sample_scene`, any caption of a held-out
   scene left out) and held-out scenes, captions and seeds (:func:`clear.mini.scenes.held_out_scenes`);
2. ``scripts/generate_data.py``: the teacher draws its training set from the training captions;
3. ``scripts/cache_prompt_embeds.py`` and ``scripts/cache_latent_codes.py``;
4. ``scripts/distill.py`` under ``accelerate launch --config_file configs/cpu.yaml``: CLEAR r=4, and
   r=4 with down-sampled keys and values (df=2), backend ``auto`` (the fastest measured one with a backward);
5. the fastest inference backend per variant and size (:func:`clear.mini.measure.pick_backend`);
6. ``scripts/generate_eval_set.py``: every variant on the held-out prompts and seeds, at the
   training size and at 2x per side;
7. 2x by SDEdit (``clear.inference.upscale``) from the teacher's training-size image;
8. seconds per image of every variant;
9. held-out velocity error to the teacher (:func:`clear.mini.measure.velocity_errors`);
10. ``scripts/evaluate.py`` (PSNR, SSIM, MS-SSIM, attention GFLOPs), image MSE and the score of the scenes
    (kind accuracy, placement, background: :func:`clear.mini.scenes.score_parts`) with its controls;
11. ``report.md``, ``metrics.json``, ``grid_<size>.png`` and ``loss.png`` (:mod:`clear.mini.report`).

Work files (data, caches, distillation runs, image folders) go under ``<out>/work``. What the
scripts run (:mod:`clear.commands`) runs in this process, and the command line that does the same
is logged and listed in the report; the distillation is ``scripts/distill.py``, which accelerate
launches as its own process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clear.commands import cache, command_line, evaluate, generate_data, generate_eval_set
from clear.data import LATENT_CODES, PROMPT_EMBEDS
from clear.files import write_text
from clear.image_sets import MANIFEST, Item, record_settings

from . import teacher as T

logger = logging.getLogger("clear.mini")

REPO = Path(__file__).resolve().parents[2]
CONTROL_SCENES = 200  # held-out scenes the score's controls are measured on, at each size


@dataclass(frozen=True)
class Variant:
    """One row of the table: ``radius=None`` is the teacher; ``trained``: distilled weights."""

    key: str  # folder and JSON name
    label: str
    radius: float | None = None
    down_factor: int = 1
    trained: bool = False

    def weights_name(self) -> str:
        return f"clear_local_{self.radius:g}" + (f"_down_{self.down_factor}" if self.down_factor > 1 else "")


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run. ``quick()`` is the reduced run the tests use."""

    model: str
    out: Path = Path("outputs/mini")
    size: int = T.SIZE  # training size in pixels (16 x 16 tokens of 4 pixels)
    scale: int = 2  # the larger size is size * scale per side
    steps: int = 20  # sampling steps (training data, evaluation, SDEdit schedule; the teacher's default is 28)
    guidance: float = T.GUIDANCE  # the teacher's guidance embedding
    max_sequence_length: int = T.MAX_SEQUENCE_LENGTH  # T5 tokens the teacher was trained with
    radius: int = 4
    down_factor: int = 2
    train_samples: int = 384
    data_batch: int = 16
    # Distillation. The paper weights L_fm + 0.5 L_distill + 0.5 L_attn over 10K steps of batch 32; in a few hundred
    # steps the flow-matching term's sampling noise drowns the signal, so L_distill and L_attn weigh 10 each here.
    # Measured on the early teacher (16 held-out prompts x 8 sigmas, distilled / zero-shot velocity error):
    # 150 steps: alpha = beta = 0.5 -> 0.69, 10 -> 0.39, 100 -> 0.38; lr 3e-3 (alpha = beta = 10) -> 0.36; 300 steps -> 0.32.
    # On the shipped teacher (docs/mini.md): 300 steps on 192 images -> 0.38, 600 on 384 -> 0.33, 1000 on 384 -> the
    # measured run; prompt following on 24 held-out prompts stayed at 0.89-0.90 of the teacher's until 1000 steps.
    distill_steps: int = 1000
    distill_steps_df: int = 150
    distill_batch: int = 8
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 10
    distill_loss_weight: float = 10.0
    attn_loss_weight: float = 10.0
    eval_prompts: int = 48
    eval_prompts_large: int = 8  # at 2x (direct and SDEdit)
    grid_prompts: int = 6
    sigmas: int = 8  # timesteps of the velocity error, evenly spread over (0, 1)
    sdedit_strength: float = 0.7
    seed: int = 0
    threads: int = 0  # 0: all cores, or 1 when other processes keep them busy (choose_threads)
    quick: bool = False

    @property
    def large(self) -> int:
        return self.size * self.scale

    @property
    def work(self) -> Path:
        return Path(self.out) / "work"

    def variants(self) -> list[Variant]:
        r, df = self.radius, self.down_factor
        return [Variant("teacher", "teacher (full attention)"),
                Variant("zero_shot", f"CLEAR r={r} zero-shot", r),
                Variant("distilled", f"CLEAR r={r} distilled", r, trained=True),
                Variant(f"distilled_df{df}", f"CLEAR r={r} df={df} distilled", r, df, trained=True)]

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


QUICK = dict(train_samples=32, data_batch=16, distill_steps=40, distill_steps_df=8, distill_batch=4,
             lr_warmup_steps=5, eval_prompts=6, eval_prompts_large=2, grid_prompts=3, sigmas=4, steps=8)


def default_model() -> str:
    return str(T.MINI_DIR)


def make_settings(*, quick: bool = False, model: str | None = None, out=Settings.out, **overrides) -> Settings:
    """The settings of a run: the defaults, or with ``quick`` the reduced run (:data:`QUICK`), then
    ``overrides`` (fields of :class:`Settings`; ``None`` keeps the value); ``model`` defaults to the shipped
    teacher (:func:`default_model`)."""
    chosen = dict(QUICK, quick=True) if quick else {}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(model=model or default_model(), out=Path(out), **chosen)


def check_teacher(model: str) -> None:
    """Stop with the fix when ``model`` holds no pipeline."""
    if not Path(model, "model_index.json").is_file():
        raise SystemExit(f"{model} holds no pipeline (model_index.json): train the teacher first with "
                         "`python scripts/mini.py train-teacher`, or pass --model DIR")


# ------------------------------------------------------------------------------------------
# Running the project's scripts
# ------------------------------------------------------------------------------------------

def _script(name: str) -> Path:
    path = REPO / "scripts" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the mini recipe runs the project's scripts, so run it from a clone "
                         "installed with `pip install --no-deps -e .` (see README.md, Install)")
    return path


class Log:
    """The commands run and the seconds each step took, for the report."""

    def __init__(self):
        self.commands: list[str] = []
        self.seconds: dict[str, float] = {}

    def step(self, name: str):
        log = self

        class _Step:
            def __enter__(self):
                logger.info("== %s", name)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                log.seconds[name] = round(log.seconds.get(name, 0.0) + time.perf_counter() - self.t0, 2)

        return _Step()

    def run(self, script: str, command, **options):
        """``command(**options)`` (what ``scripts/<script>.py`` runs, :mod:`clear.commands`), in this
        process; logged as the command line that does the same."""
        self.commands.append(command_line(script, options))
        logger.info("$ %s", self.commands[-1])
        return command(**options)

    def launch(self, argv: list[str], threads: int):
        """``accelerate launch --config_file configs/cpu.yaml`` of ``argv`` (a script and its
        arguments), as its own process, with this checkout first on the import path."""
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu.yaml"),
               "--num_cpu_threads_per_process", str(threads), *argv]
        self.commands.append(shlex.join(["accelerate", "launch", *cmd[3:]]).replace(str(REPO) + "/", ""))
        logger.info("$ %s", self.commands[-1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        if proc.returncode:
            raise SystemExit(f"the distillation failed (exit {proc.returncode}); its log is above. Re-running "
                             "`python scripts/mini.py` resumes it from its last checkpoint")


# ------------------------------------------------------------------------------------------
# The steps
# ------------------------------------------------------------------------------------------

def write_prompts(s: Settings) -> dict:
    """Held-out scenes (keys ``h0000``...) and training captions none of which is a held-out caption."""
    from .scenes import caption, held_out_scenes, sample_scene

    held = held_out_scenes(max(s.eval_prompts, s.eval_prompts_large), seed=s.seed)
    held_captions = {caption(sc) for sc in held}
    rng, train, left_out = random.Random(s.seed), [], 0
    while len(train) < s.train_samples:
        text = caption(sample_scene(rng))
        if text in held_captions:
            left_out += 1
            continue
        train.append(text)
    prompts = s.work / "prompts"
    write_text(prompts / "train.jsonl", "".join(json.dumps({"key": f"t{i:06d}", "prompt": t}) + "\n"
                                                for i, t in enumerate(train)))
    for name, n in (("eval", s.eval_prompts), ("eval_large", s.eval_prompts_large)):
        write_text(prompts / f"{name}.jsonl", "".join(
            json.dumps({"key": f"h{i:04d}", "prompt": caption(sc), "scene": sc.to_json()}) + "\n"
            for i, sc in enumerate(held[:n])))
    return {"train": len(train), "held_out": len(held), "train_captions_left_out": left_out,
            "distinct_train_captions": len(set(train))}


def read_held_out(s: Settings, name: str = "eval") -> list[dict]:
    from .scenes import Scene

    rows = [json.loads(line) for line in (s.work / "prompts" / f"{name}.jsonl").read_text().splitlines() if line]
    return [dict(r, scene=Scene.from_json(r["scene"])) for r in rows]


def eval_seed(s: Settings) -> int:
    """Image seeds of the held-out set (seed + index); training images use 0 ... train_samples - 1."""
    from .scenes import HELD_OUT_SEED0

    return HELD_OUT_SEED0 + s.seed


def weights_path(s: Settings, variant: Variant) -> Path:
    """Where the run ``s`` writes the distilled CLEAR weights of ``variant``
    (``<out>/work/distill/<key>/clear_local_<r>[_down_<df>].safetensors``)."""
    return s.work / "distill" / variant.key / f"{variant.weights_name()}.safetensors"


def distill(s: Settings, log: Log, variant: Variant, steps: int) -> Path:
    weights = weights_path(s, variant)
    out = weights.parent
    if weights.is_file() and (out / f"checkpoint-{steps}").is_dir():
        logger.info("%s: already trained (%s)", variant.label, weights)
        return weights
    log.launch([str(_script("distill")), "--pretrained_model_name_or_path", s.model, "--data_root",
                str(s.work / "data"), "--use_cached_prompt_embed", "--use_cached_latent", "--resolution", str(s.size),
                "--radius", str(variant.radius), "--down_factor", str(variant.down_factor), "--attn_backend", "auto",
                "--max_sequence_length", str(s.max_sequence_length), "--train_batch_size", str(s.distill_batch),
                "--max_train_steps", str(steps), "--learning_rate", str(s.learning_rate),
                "--lr_scheduler", "cosine", "--lr_warmup_steps", str(s.lr_warmup_steps),
                "--distill_loss_weight", str(s.distill_loss_weight), "--attn_loss_weight", str(s.attn_loss_weight),
                "--dataloader_num_workers", "0", "--checkpointing_steps", str(max(1, steps // 2)),
                "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest", "--report_to", "tensorboard",
                "--seed", str(s.seed), "--output_dir", str(out)], torch.get_num_threads())
    return weights


def write_sdedit_folder(s: Settings, pipe, variant: Variant, rows: list[dict], backend: str) -> tuple[Path, list[float]]:
    """Each held-out image of the teacher at the training size, upscaled to 2x by SDEdit with
    ``pipe`` (``variant`` applied); a generation.json like generate_eval_set's, for evaluate.py."""
    import clear.inference as inf
    from PIL import Image
    from tqdm.auto import tqdm

    base, out = s.work / "eval" / str(s.size) / "teacher", s.work / "eval" / f"{s.large}_sdedit" / variant.key
    settings = {"label": variant.label, "model": s.model, "radius": variant.radius, "down_factor": variant.down_factor,
                "backend": backend if variant.radius else None, "height": s.large, "width": s.large,
                "num_inference_steps": s.steps, "max_sequence_length": s.max_sequence_length,
                "strength": s.sdedit_strength, "ntk_factor": 1, "proportional_attention": False,
                "shift": "the scheduler's", "source": str(base), "base_seed": eval_seed(s)}
    record_settings(out / MANIFEST, settings,
                    [Item(r["key"], r["prompt"], eval_seed(s) + i) for i, r in enumerate(rows)])
    seconds = []
    for i, r in enumerate(tqdm(rows, desc=f"SDEdit {s.large}px {variant.key}", unit="img")):
        target = out / f"{r['key']}.png"
        if target.is_file():  # made by an earlier, interrupted run: its time is in the PNG's settings
            with Image.open(target) as im:
                seconds.append(float(im.text["clear:seconds"]))
            continue
        with Image.open(base / f"{r['key']}.png") as im:
            source = im.convert("RGB")
        # the mini model's own schedule and positions: FLUX.1's extrapolation defaults (NTK 10, L0 = 64^2+512
        # tokens, shift 3) are tuned for 1024^2 -> 4K, not for a model trained on 16x16 tokens
        res = inf.upscale(pipe, source, r["prompt"], s.large, s.large, strength=s.sdedit_strength, steps=s.steps,
                          guidance=s.guidance, seed=eval_seed(s) + i, ntk_factor=1, proportional=False, shift=None,
                          tiling=False, max_sequence_length=s.max_sequence_length)
        inf.save_png(res.image, target, res.settings)
        seconds.append(res.seconds)
    return out, seconds


def run(s: Settings) -> dict:
    """The whole recipe; returns what metrics.json holds."""
    from PIL import Image

    import clear.inference as inf

    from . import measure, report
    from .scenes import controls as score_controls

    check_teacher(s.model)
    t_start = time.perf_counter()
    torch.set_num_threads(choose_threads(s.threads))
    s.work.mkdir(parents=True, exist_ok=True)
    log, variants = Log(), s.variants()
    teacher_v, zero_v, dist_v, df_v = variants
    common = {"max_sequence_length": s.max_sequence_length}

    with log.step("prompts"):
        counts = write_prompts(s)
    with log.step("generate training data"):
        log.run("generate_data", generate_data.run, pretrained_model_name_or_path=s.model,
                prompts=str(s.work / "prompts" / "train.jsonl"), output_dir=str(s.work / "data"), height=s.size,
                width=s.size, num_inference_steps=s.steps, samples_per_shard=s.train_samples,
                batch_size=s.data_batch, guidance_scale=s.guidance, seed=0, **common)
    with log.step("cache features"):
        log.run("cache_prompt_embeds", functools.partial(cache.run, PROMPT_EMBEDS),
                pretrained_model_name_or_path=s.model, data_root=str(s.work / "data"), batch_size=64, **common)
        log.run("cache_latent_codes", functools.partial(cache.run, LATENT_CODES),
                pretrained_model_name_or_path=s.model, data_root=str(s.work / "data"), resolution=s.size,
                batch_size=64)
    weights = {}
    with log.step("distill"):
        weights[dist_v.key] = distill(s, log, dist_v, s.distill_steps)
        weights[df_v.key] = distill(s, log, df_v, s.distill_steps_df)

    pixels_per_token = inf.size_multiple(s.model)
    teacher = measure.load_transformer(s.model)
    attention_dim = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    with log.step("choose backends"):
        backends, backend_times = {}, {}
        for size in (s.size, s.large):
            for df in sorted({v.down_factor for v in variants if v.radius}):
                best, times = measure.pick_backend(teacher, s.radius, df, size, pixels_per_token, s.max_sequence_length)
                backends[(size, df)], backend_times[f"{size}px df={df}"] = best, times
                logger.info("%dpx, r=%d df=%d: %s fastest (%s)", size, s.radius, df, best, times)

    def checkpoint_of(v: Variant):
        return str(weights[v.key]) if v.trained else "none"

    held, held_large = read_held_out(s, "eval"), read_held_out(s, "eval_large")
    folders = {}
    with log.step("evaluation images"):
        for size, name in ((s.size, "eval"), (s.large, "eval_large")):
            for v in variants:
                folder = s.work / "eval" / str(size) / v.key
                options = dict(prompts=str(s.work / "prompts" / f"{name}.jsonl"), out=str(folder), model=s.model,
                               label=v.label, height=size, width=size, steps=s.steps, guidance=s.guidance,
                               seed=eval_seed(s), device="cpu", batch_size=8, **common)
                if v.radius is not None:
                    options.update(radius=v.radius, down_factor=v.down_factor, checkpoint=checkpoint_of(v),
                                   backend=backends[(size, v.down_factor)])
                log.run("generate_eval_set", generate_eval_set.run, **options)
                folders[(str(size), v.key)] = folder

    seconds = {}
    with log.step("SDEdit 2x and timings"):
        for v in variants:
            pipe = inf.load_pipeline(s.model, device="cpu", dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            backend = backends[(s.large, v.down_factor)] if v.radius else None
            if v.radius is not None:
                inf.apply_to_pipeline(pipe, v.radius, v.down_factor, weights.get(v.key) if v.trained else None,
                                      backend=backend)
            folder, sd_seconds = write_sdedit_folder(s, pipe, v, held_large, backend)
            folders[(f"{s.large}_sdedit", v.key)] = folder
            for size in (s.size, s.large):
                if v.radius is not None:
                    pipe.transformer.clear_state.core.backend = backends[(size, v.down_factor)]
                res = inf.generate(pipe, held[0]["prompt"], size, size, steps=s.steps, guidance=s.guidance,
                                   seed=eval_seed(s), max_sequence_length=s.max_sequence_length, warmup=True)
                seconds[(str(size), v.key)] = {"seconds": res.seconds, "backend": res.settings.get("backend", "sdpa")}
            if sd_seconds:
                seconds[(f"{s.large}_sdedit", v.key)] = {"seconds": sum(sd_seconds) / len(sd_seconds),
                                                         "backend": backend or "sdpa"}
            del pipe

    with log.step("velocity error"):
        students = {v.key: measure.load_transformer(s.model, v.radius, v.down_factor,
                                                    weights.get(v.key) if v.trained else None, base=teacher)
                    for v in variants if v.radius is not None}
        velocity = {}
        for size, rows in ((s.size, held), (s.large, held_large)):
            images = [Image.open(s.work / "eval" / str(size) / "teacher" / f"{r['key']}.png").convert("RGB")
                      for r in rows]
            velocity[str(size)] = measure.velocity_errors(
                s.model, teacher, students, [r["prompt"] for r in rows], images,
                [(j + 0.5) / s.sigmas for j in range(s.sigmas)], seed=s.seed + 7, max_sequence_length=s.max_sequence_length)

    with log.step("evaluate"):
        evaluations, following, mse = {}, {}, {}
        for size_key, rows in ((str(s.size), held), (str(s.large), held_large), (f"{s.large}_sdedit", held_large)):
            ref = folders[(size_key, teacher_v.key)]
            evaluations[size_key] = log.run(
                "evaluate", evaluate.run, original=str(ref), out=str(s.work / "evaluate" / size_key),
                metrics="psnr,ssim,ms_ssim,gflops", workers=0, device="cpu", batch_size=16,
                pixels_per_token=pixels_per_token, attention_dim=attention_dim,
                names=",".join(v.label for v in variants),
                clear=[str(folders[(size_key, v.key)]) for v in variants[1:]])
            scenes = {r["key"]: r["scene"] for r in rows}
            for v in variants:
                following[(size_key, v.key)] = measure.scene_scores(folders[(size_key, v.key)], scenes)
                if v is not teacher_v:
                    mse[(size_key, v.key)] = measure.image_mse(ref, folders[(size_key, v.key)])
        controls = {str(size): score_controls(n=CONTROL_SCENES, seed=s.seed + 1, size=size)
                    for size in (s.size, s.large)}

    metrics = report.collect(s, variants, counts=counts, velocity=velocity, evaluations=evaluations,
                             following=following, mse=mse, seconds=seconds, controls=controls, backend_times=backend_times,
                             commands=log.commands, step_seconds=log.seconds, teacher=teacher,
                             pixels_per_token=pixels_per_token,
                             machine=machine(), wall_seconds=time.perf_counter() - t_start)
    report.write_all(s, metrics, folders)
    return metrics


def choose_threads(requested: int) -> int:
    """``requested`` threads, or (0) all cores, unless other processes already keep a core busy: then 1,
    because OpenMP threads that wait for each other on a shared CPU run several times slower than one
    thread (measured here: a distillation step went from 1.2 s to 8 s when another job started)."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and busy >= 1:
        logger.info("load average %.1f on %d cores: 1 torch thread (pass --threads N to choose)", busy, cores)
        return 1
    return torch.get_num_threads()


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
