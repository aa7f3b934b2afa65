"""Plug-and-play, as the paper claims: the CLEAR weights distilled from the *base* mini teacher, applied
unchanged to a LoRA of that teacher trained on a new style, measured against the LoRA teacher itself.

    python scripts/mini.py lora             # train the LoRA (resumable), measure, write outputs/mini/lora/
    python scripts/mini.py lora --quick     # a reduced run

:func:`run` takes the :class:`LoraSettings` (:func:`make_settings`: the defaults, the reduced run and
overrides); scripts/mini.py is the command line. Steps:

1. the CLEAR weights of the base recipe (``python scripts/mini.py`` writes them:
   :func:`default_clear_weights`) are checked first, before anything loads;
2. data: ``train_scenes`` training scenes rendered in the new style (:func:`clear.mini.scenes.render`,
   ``style``), encoded with the pipeline's own VAE and ``encode_prompt`` (:func:`clear.mini.teacher.encode_dataset`),
   cached under ``<out>/work``;
3. the LoRA: a peft ``LoraConfig`` on the transformer's attention and MLP linears (``transformer.add_adapter``),
   trained with the teacher's own flow matching (:func:`clear.mini.teacher.flow_matching_loss`), AdamW on the
   LoRA weights only, resumable from ``<out>/work/lora_state.pt``; saved with ``FluxPipeline.save_lora_weights``
   to ``<out>/weights/pytorch_lora_weights.safetensors``, so that ``pipe.load_lora_weights(<out>/weights)``
   loads it;
4. the LoRA teacher: the teacher pipeline with that file loaded by ``pipe.load_lora_weights`` (full
   attention); CLEAR zero-shot on it (``clear.apply_clear``, radius ``radius``, no weights); CLEAR with the
   base-distilled weights (``clear.apply_clear`` + ``clear.load_clear_weights``: they go into the attention
   projections under the LoRA, which stays on top); and, as a control, the base teacher with the LoRA off;
5. against the LoRA teacher, on held-out scenes and seeds: the held-out velocity error
   (:func:`clear.mini.measure.velocity_errors`, on the LoRA teacher's own images), the same-seed PSNR, and
   the kind accuracy of each variant's images (:func:`clear.mini.scenes.score_images` in the style);
6. ``<out>/report.md`` (the table to paste into docs/mini.md, with the command and the date),
   ``<out>/metrics.json`` and ``<out>/grid.png`` (per prompt: LoRA teacher | zero-shot | base-distilled |
   base teacher).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clear.files import atomic_path, write_text

from . import recipe
from . import scenes as S
from . import teacher as T

# The linears the LoRA adapts: every attention projection (image and text streams) and every MLP linear of
# both block types, and the final projection (peft matches each name as a module-name suffix).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLP_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
LORA_FILE = "pytorch_lora_weights.safetensors"  # what FluxPipeline.save_lora_weights writes
ROWS = ("lora_teacher", "zero_shot", "distilled", "base_teacher")  # the table's rows, in order
GRID_LABELS = {"lora_teacher": "LoRA teacher", "zero_shot": "zero-shot + LoRA", "distilled": "base-distilled + LoRA",
               "base_teacher": "base teacher, no LoRA"}


def default_clear_weights() -> Path:
    """The CLEAR r = 4 weights the base recipe (``python scripts/mini.py``, default settings) distils from the
    base teacher: ``outputs/mini/work/distill/distilled/clear_local_4.safetensors``."""
    base = recipe.make_settings()
    return recipe.weights_path(base, next(v for v in base.variants() if v.trained and v.down_factor == 1))


@dataclass(frozen=True)
class LoraSettings:
    """Everything that defines a run. ``quick`` marks the reduced run (:data:`QUICK`)."""

    model: str = str(T.MINI_DIR)  # the base teacher pipeline folder
    out: Path = Path("outputs/mini/lora")  # the LoRA (weights/), report.md, metrics.json, grid.png; work/: work files
    # the CLEAR weights distilled from the base teacher (default: where `python scripts/mini.py` writes them)
    clear_weights: Path = dataclasses.field(default_factory=default_clear_weights)
    radius: int = recipe.Settings.radius  # CLEAR's window radius in tokens (the weights' own)
    style: str = "outline"  # the LoRA's new style: one of clear.mini.scenes.STYLES other than "flat"
    rank: int = 8  # LoRA rank
    alpha: float = 8.0  # LoRA alpha (the update is scaled by alpha / rank)
    attention: bool = True  # adapt the attention projections (ATTENTION_TARGETS)
    mlp: bool = True  # adapt the MLP linears and the final projection (MLP_TARGETS)
    train_scenes: int = 4000  # training scenes rendered in the style (seeds 0 ..., as the teacher's)
    steps: int = 1200  # LoRA training steps
    batch_size: int = 16
    lr: float = 2e-3  # AdamW learning rate of the LoRA weights (warm-up, then cosine down to 10%)
    warmup: int = 50  # warm-up steps
    timesteps: str = "uniform"  # noise-level distribution (clear.mini.teacher.TIMESTEPS), as the teacher's training
    eval_prompts: int = 48  # held-out scenes and seeds of the measurement
    sample_steps: int = 20  # sampling steps of the held-out images (the base recipe's)
    sigmas: int = 8  # timesteps of the velocity error, (j + 0.5) / sigmas
    grid_prompts: int = 6  # prompts in grid.png
    seed: int = 0  # training seed; held-out scenes and image seeds as the base recipe's (recipe.eval_seed)
    threads: int = 1  # torch threads (0: torch's default); 1 is fastest on a shared 2-core machine
    quick: bool = False  # the reduced run

    def __post_init__(self):
        if self.style not in S.STYLES or self.style == "flat":
            raise ValueError(f"style={self.style!r}: the LoRA needs a new style, one of "
                             f"{', '.join(x for x in S.STYLES if x != 'flat')}")
        if self.timesteps not in T.TIMESTEPS:
            raise ValueError(f"timesteps={self.timesteps!r}: choose one of {', '.join(T.TIMESTEPS)}")
        if not (self.attention or self.mlp):
            raise ValueError("attention=False and mlp=False leave the LoRA nothing to adapt: keep one of them")
        if min(self.rank, self.steps, self.batch_size, self.eval_prompts, self.sigmas, self.sample_steps) < 1:
            raise ValueError("rank, steps, batch_size, eval_prompts, sigmas and sample_steps must be >= 1")

    @property
    def work(self) -> Path:
        return Path(self.out) / "work"

    @property
    def weights_dir(self) -> Path:
        """The folder ``pipe.load_lora_weights`` takes."""
        return Path(self.out) / "weights"

    def targets(self) -> tuple[str, ...]:
        return (ATTENTION_TARGETS if self.attention else ()) + (MLP_TARGETS if self.mlp else ())

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


QUICK = dict(train_scenes=64, steps=40, batch_size=8, warmup=5, eval_prompts=6, sample_steps=8, sigmas=4,
             grid_prompts=3)


def make_settings(*, quick: bool = False, **overrides) -> LoraSettings:
    """The settings of a run: the defaults, or with ``quick`` the reduced run (:data:`QUICK`), then
    ``overrides`` (fields of :class:`LoraSettings`; ``None`` keeps the value)."""
    chosen = dict(QUICK, quick=True) if quick else {}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("out", "clear_weights"):
        if key in chosen:
            chosen[key] = Path(chosen[key])
    return LoraSettings(**chosen)


def check_inputs(s: LoraSettings) -> None:
    """Stop with one line naming the fix when the teacher or the base-distilled CLEAR weights are missing, or the
    weights are for another window than ``s.radius`` without pooled tokens (read from their header only)."""
    recipe.check_teacher(s.model)
    if not Path(s.clear_weights).is_file():
        command = "python scripts/mini.py" + ("" if s.model == LoraSettings.model else f" --model {s.model}")
        made = "" if Path(s.clear_weights) == default_clear_weights() else f" (it writes {default_clear_weights()})"
        raise SystemExit(f"no CLEAR weights at {s.clear_weights}: distil them from the base teacher with "
                         f"`{command}`{made}, or pass --clear_weights FILE")
    from clear.weights import file_variant

    radius, down_factor, known = file_variant(s.clear_weights)
    if not known or radius != s.radius or down_factor != 1:
        window = f"r={radius:g}, df={down_factor}" if known and radius is not None else "an unknown window"
        raise SystemExit(f"{s.clear_weights} holds CLEAR weights for {window}; this run applies r={s.radius} without "
                         f"pooled tokens: pass --radius to match, or --clear_weights the base recipe's r = {s.radius} "
                         "file (clear_local_<r>.safetensors)")


# ------------------------------------------------------------------------------------------
# The LoRA
# ------------------------------------------------------------------------------------------

def lora_config(s: LoraSettings):
    """The peft ``LoraConfig`` of the run (``init_lora_weights="gaussian"``: B = 0, the LoRA starts as a no-op)."""
    from peft import LoraConfig

    return LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(s.targets()), init_lora_weights="gaussian")


def _lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def _lr(s: LoraSettings, step: int) -> float:
    return s.lr * min(1.0, (step + 1) / s.warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, step / s.steps)))


def train_lora(pipe, data: dict, s: LoraSettings, checkpoint_every_s: float = 120.0, on_checkpoint=None) -> dict:
    """Add the LoRA (:func:`lora_config`) to ``pipe.transformer`` and train it on ``data``
    (:func:`clear.mini.teacher.encode_dataset`) with the teacher's flow matching, one batch per step from the
    step's own generator; AdamW on the LoRA weights, warm-up and cosine LR. Resumes from
    ``<work>/lora_state.pt`` (written every ``checkpoint_every_s`` seconds and at the end; ``on_checkpoint(step)``
    after each write; a state of other settings, ``steps`` aside, is refused); logs to ``<work>/lora_log.jsonl``.
    Returns ``{"trainable_params", "final_loss"}``."""
    model = pipe.transformer
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the LoRA's initial A from the run's seed, torch's own generator untouched
        torch.manual_seed(s.seed)
        model.add_adapter(lora_config(s))
    params = _lora_params(model)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
    work = s.work
    work.mkdir(parents=True, exist_ok=True)
    state_path, log_path = work / "lora_state.pt", work / "lora_log.jsonl"
    start = 0
    key = {k: v for k, v in _training_key(s).items() if k != "steps"}  # a run may be resumed to more steps
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)
        if st.get("settings") != key:
            raise ValueError(f"{state_path} is the state of a LoRA trained with other settings ({st.get('settings')}, "
                             f"now {key}): pass another --out, or delete {state_path} to start again")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(st["lora"][n])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        print(f"[lora] resumed at step {start}", flush=True)
    shift = T.training_shift(pipe, data)
    model.train()
    t0, t_last, loss = time.time(), time.time(), None
    for step in range(start, s.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(s, step)
        loss = T.flow_matching_loss(model, pipe, data, T.step_generator(s.seed, step), s.batch_size, shift,
                                    s.timesteps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        if step % 10 == 0 or step == s.steps - 1:
            el = time.time() - t0
            T._log(log_path, step=step, loss=loss.item(), grad_norm=float(gn), lr=opt.param_groups[0]["lr"], t=el)
            if step % 50 == 0 or step == s.steps - 1:
                print(f"[lora] step {step}/{s.steps} loss {loss.item():.4f} ({el:.0f}s)", flush=True)
        if time.time() - t_last > checkpoint_every_s or step == s.steps - 1:
            T._save_state(state_path, {"lora": {n: p.detach().clone() for n, p in params.items()},
                                       "opt": opt.state_dict(), "step": step + 1, "settings": key})
            t_last = time.time()
            if on_checkpoint is not None:
                on_checkpoint(step + 1)
    model.eval()
    return {"trainable_params": sum(p.numel() for p in params.values()),
            "final_loss": loss.item() if loss is not None else None}


def save_lora(pipe, folder: Path) -> Path:
    """The LoRA of ``pipe.transformer`` (adapter ``default``) in diffusers' layout, with its ``LoraConfig`` as
    metadata (rank, alpha, targets): ``FluxPipeline.save_lora_weights``; ``pipe.load_lora_weights(folder)``
    loads it. Returns the file."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    model = pipe.transformer
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return Path(folder) / LORA_FILE


def make_lora(s: LoraSettings) -> dict:
    """The trained LoRA under ``s.weights_dir`` (made, or found complete from an earlier run): encode the
    style's training scenes (cached), train (resumable), save. Returns what the report says of it."""
    from diffusers import FluxPipeline

    done = s.work / "lora_done.json"
    if (s.weights_dir / LORA_FILE).is_file() and done.is_file():
        info = json.loads(done.read_text())
        if info.get("settings") == _training_key(s):
            print(f"[lora] trained already: {s.weights_dir / LORA_FILE}", flush=True)
            return info
    t0 = time.time()
    pipe = FluxPipeline.from_pretrained(s.model)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.eval()
    data_path = s.work / f"data_{s.style}_{s.seed}_{s.train_scenes}.pt"
    if data_path.exists():
        data = torch.load(data_path, weights_only=True)
    else:
        data = T.encode_dataset(pipe, s.train_scenes, s.seed, batch_size=min(128, s.train_scenes), style=s.style)
        s.work.mkdir(parents=True, exist_ok=True)
        T._save_state(data_path, data)
    info = train_lora(pipe, data, s)
    path = save_lora(pipe, s.weights_dir)
    info.update(settings=_training_key(s), file=str(path), seconds_this_run=round(time.time() - t0, 1))
    write_text(done, json.dumps(info, indent=1))
    return info


def _training_key(s: LoraSettings) -> dict:
    """The settings the trained LoRA depends on (a finished LoRA is reused only when they match)."""
    keys = ("model", "style", "rank", "alpha", "attention", "mlp", "train_scenes", "steps", "batch_size", "lr",
            "warmup", "timesteps", "seed")
    return {k: s.as_dict()[k] for k in keys}


# ------------------------------------------------------------------------------------------
# Measuring base-distilled CLEAR on the LoRA teacher
# ------------------------------------------------------------------------------------------

def load_variants(s: LoraSettings) -> tuple[object, dict]:
    """``(pipe, transformers)``: the teacher pipeline with the saved LoRA loaded (``pipe.load_lora_weights``)
    and ``{row: transformer}`` for :data:`ROWS`: the LoRA teacher (full attention, LoRA on), CLEAR zero-shot
    and CLEAR base-distilled (copies of it with ``clear.apply_clear``; the distilled weights loaded into the
    projections under the LoRA by ``clear.load_clear_weights``), the base teacher (no LoRA)."""
    from diffusers import FluxPipeline

    from . import measure

    pipe = FluxPipeline.from_pretrained(s.model)
    pipe.load_lora_weights(s.weights_dir)
    pipe.set_progress_bar_config(disable=True)
    lora_teacher = pipe.transformer.eval().requires_grad_(False)
    models = {"lora_teacher": lora_teacher,
              "zero_shot": measure.load_transformer(s.model, s.radius, base=lora_teacher),
              "distilled": measure.load_transformer(s.model, s.radius, checkpoint=s.clear_weights, base=lora_teacher),
              "base_teacher": measure.load_transformer(s.model)}
    return pipe, models


def labels(s: LoraSettings) -> dict[str, str]:
    """The table's name of each row of :data:`ROWS`."""
    return {"lora_teacher": "LoRA teacher (full attention)", "zero_shot": f"CLEAR r={s.radius} zero-shot + LoRA",
            "distilled": f"CLEAR r={s.radius} base-distilled + LoRA",
            "base_teacher": "control: base teacher, LoRA off (full attention)"}


def with_transformer(pipe, transformer):
    """A pipeline sharing ``pipe``'s components but ``transformer``."""
    return type(pipe)(**{**pipe.components, "transformer": transformer})


def _psnr_each(images, reference) -> list[float]:
    return [T.psnr(T.images_tensor([a]), T.images_tensor([b])) for a, b in zip(images, reference, strict=True)]


def measure_variants(s: LoraSettings, pipe, models: dict) -> dict:
    """Every row of :data:`ROWS` against the LoRA teacher on ``s.eval_prompts`` held-out scenes and seeds:
    ``{"rows": {row: {...}}, "images": {row: [PIL]}, "scenes", "style_check"}``."""
    from . import measure

    held = S.held_out_scenes(s.eval_prompts, seed=s.seed)
    seed = S.HELD_OUT_SEED0 + s.seed  # the base recipe's held-out image seeds (recipe.eval_seed)
    images = {}
    for row in ROWS:
        t0 = time.time()
        images[row] = T.generate(with_transformer(pipe, models[row]), held, seed=seed, steps=s.sample_steps)
        print(f"[measure] {row}: {len(held)} images ({time.time() - t0:.0f}s)", flush=True)
    students = {row: models[row] for row in ROWS if row != "lora_teacher"}
    velocity = measure.velocity_errors(s.model, models["lora_teacher"], students, [S.caption(sc) for sc in held],
                                       images["lora_teacher"], [(j + 0.5) / s.sigmas for j in range(s.sigmas)],
                                       seed=s.seed + 7, max_sequence_length=T.MAX_SEQUENCE_LENGTH)
    rows = {}
    for row in ROWS:
        scored = S.score_images(images[row], held, style=s.style)
        r = {"label": labels(s)[row], "kind_accuracy": scored["kind_accuracy"], "placement": scored["placement"],
             "background": scored["background"]}
        if row != "lora_teacher":
            r.update(velocity_mse=velocity[row]["mse"], velocity_relative=velocity[row]["relative"],
                     velocity_per_sigma=velocity[row]["per_sigma"],
                     psnr=float(np.mean(_psnr_each(images[row], images["lora_teacher"]))))
        rows[row] = r
    zero = rows["zero_shot"]
    for r in rows.values():
        if "velocity_mse" in r:
            r["velocity_vs_zero_shot"] = r["velocity_mse"] / zero["velocity_mse"]
            r["psnr_gain_vs_zero_shot"] = r["psnr"] - zero["psnr"]
    style_check = {row: {style: float(np.mean(_psnr_each(images[row], [S.render(sc, T.SIZE, style) for sc in held])))
                         for style in ("flat", s.style)} for row in ("lora_teacher", "base_teacher")}
    return {"rows": rows, "images": images, "scenes": held, "style_check": style_check}


def bars(rows: dict) -> dict:
    """The issue's bar: base-distilled CLEAR closer to the LoRA teacher than zero-shot CLEAR, in velocity error and
    in PSNR."""
    d, z = rows["distilled"], rows["zero_shot"]
    return {"velocity": {"text": "velocity error to the LoRA teacher: base-distilled below zero-shot",
                         "value": f"{_mse(d['velocity_mse'])} vs {_mse(z['velocity_mse'])} "
                                  f"({d['velocity_vs_zero_shot']:.2f}x)",
                         "pass": d["velocity_mse"] < z["velocity_mse"]},
            "psnr": {"text": "same-seed PSNR to the LoRA teacher: base-distilled above zero-shot",
                     "value": f"{d['psnr']:.2f} dB vs {z['psnr']:.2f} dB ({d['psnr_gain_vs_zero_shot']:+.2f} dB)",
                     "pass": d["psnr"] > z["psnr"]}}


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def _f(value, decimals: int) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"


def _mse(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"


def table(metrics: dict) -> list[str]:
    """The markdown table: one line per row of :data:`ROWS`."""
    out = ["| variant | velocity MSE to the LoRA teacher ↓ (÷ zero-shot) | PSNR to the LoRA teacher ↑ "
           "| kind accuracy ↑ | placement ↑ |", "|---|---:|---:|---:|---:|"]
    for row in ROWS:
        r = metrics["rows"][row]
        v = "—" if "velocity_mse" not in r else f"{_mse(r['velocity_mse'])} ({r['velocity_vs_zero_shot']:.2f})"
        out.append(f"| {r['label']} | {v} | {_f(r.get('psnr'), 2)} | {_f(r['kind_accuracy'], 3)} "
                   f"| {_f(r['placement'], 3)} |")
    return out


def _bar_lines(metrics: dict) -> list[str]:
    return [f"{'PASS' if b['pass'] else 'FAIL'}: {b['text']}: {b['value']}" for b in metrics["bars"].values()]


def markdown(metrics: dict) -> str:
    """report.md: the command and the date, what was measured, the table, the bars, the style check."""
    s, lora, sc, m = metrics["settings"], metrics["lora"], metrics["style_check"], metrics["machine"]
    weights = metrics["clear_weights"]
    style = s["style"]
    setup = (f"CLEAR r = {s['radius']} weights distilled from the **base** teacher (`{weights['path']}`, sha256 "
             f"{weights['sha256'][:12]}…), applied unchanged to the teacher with a LoRA trained on the `{style}` "
             f"style (rank {s['rank']}, alpha {s['alpha']:g}, {lora['trainable_params']:,} parameters on "
             f"{', '.join(metrics['targets'])}; {s['steps']} steps of batch {s['batch_size']} on {s['train_scenes']} "
             f"scenes, lr {s['lr']:g}; loaded with `pipe.load_lora_weights({metrics['lora_dir']})`).")
    held = (f"{s['eval_prompts']} held-out scenes and seeds at {metrics['size']} px, {s['sample_steps']} sampling "
            f"steps; velocity error over σ = (j + 0.5)/{s['sigmas']} on the LoRA teacher's own images; kind "
            f"accuracy scored in the `{style}` style (`clear.mini.scenes.score_images`).")
    check = (f"Style check (does the LoRA draw its style?): PSNR of the LoRA teacher's images to the scenes rendered "
             f"`{style}` {sc['lora_teacher'][style]:.2f} dB, rendered `flat` {sc['lora_teacher']['flat']:.2f} dB; of "
             f"the base teacher's: {sc['base_teacher'][style]:.2f} / {sc['base_teacher']['flat']:.2f} dB.")
    lines = ["# Mini CLEAR: plug-and-play on a LoRA of the teacher", "",
             f"`{metrics['command']}` — {metrics['date']}, {metrics['seconds']:.0f} s ({m['cpu_count']} cores, "
             f"torch threads: {m['torch_threads']}).", "", f"{setup} {held}", "", *table(metrics), "",
             *_bar_lines(metrics), "", check, "",
             "`grid.png`: per prompt, " + " | ".join(GRID_LABELS[r] for r in ROWS) + "."]
    return "\n".join(lines) + "\n"


def summary(metrics: dict) -> str:
    """What the command prints: the table and the bars."""
    return "\n".join([*table(metrics), "", *_bar_lines(metrics)])


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_outputs(s: LoraSettings, metrics: dict, measured: dict) -> None:
    from .report import grid_image

    out = Path(s.out)
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    write_text(out / "report.md", markdown(metrics))
    n = min(s.grid_prompts, len(measured["scenes"]))
    grid = grid_image([(S.caption(measured["scenes"][i]), [measured["images"][r][i] for r in ROWS])
                       for i in range(n)], [GRID_LABELS[r] for r in ROWS], panel=128)
    with atomic_path(out / "grid.png") as tmp:
        grid.save(tmp, format="png")


def run(s: LoraSettings, command: str = "") -> dict:
    """The whole run (see the module's docstring); returns what ``<out>/metrics.json`` holds."""
    check_inputs(s)
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.time()
    lora_info = make_lora(s)
    pipe, models = load_variants(s)
    measured = measure_variants(s, pipe, models)
    metrics = {"command": command, "date": datetime.date.today().isoformat(), "settings": s.as_dict(),
               "targets": list(s.targets()), "size": T.SIZE, "lora": lora_info, "lora_dir": str(s.weights_dir),
               "clear_weights": {"path": str(s.clear_weights), "sha256": _sha256(s.clear_weights)},
               "rows": measured["rows"], "style_check": measured["style_check"], "bars": bars(measured["rows"]),
               "machine": recipe.machine(), "seconds": time.time() - t0}
    write_outputs(s, metrics, measured)
    return metrics
