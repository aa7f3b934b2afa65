"""The CLEAR recipe on the mini teacher, on a CPU (clear/mini/recipe.py), and the training of that teacher
(clear/mini/teacher.py): the command line of both.

    python scripts/mini.py                  # the full run, <= 15 minutes on 2 CPU cores
    python scripts/mini.py --quick          # a reduced run
    python scripts/mini.py run [...]        # the same as without `run`
    python scripts/mini.py train-teacher    # train the mini teacher (see ckpt/mini/TRAINING.md)
    python scripts/mini.py highres          # the SDEdit cascade 64 -> 512 px (clear/mini/highres.py)
    python scripts/mini.py teacher-curve --work-dir ckpt/mini_run   # held-out score of each EMA snapshot
    python scripts/mini.py lora             # base-distilled CLEAR on a LoRA of the teacher (clear/mini/lora.py)
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from clear.mini import highres, lora, recipe, report, teacher

PROG = "python scripts/mini.py"
# Settings fields the recipe's command line can override (the rest are fixed by the recipe)
RECIPE_OPTIONS = ("size", "steps", "max_sequence_length", "train_samples", "distill_steps", "distill_steps_df",
                  "distill_batch", "learning_rate", "distill_loss_weight", "attn_loss_weight", "eval_prompts",
                  "eval_prompts_large", "grid_prompts", "sigmas", "seed", "threads")


def parse_recipe_args(argv=None) -> recipe.Settings:
    fields = {f.name: f for f in dataclasses.fields(recipe.Settings)}
    p = argparse.ArgumentParser(prog=PROG, description=recipe.__doc__.split("\n\n")[0],
                                epilog=f"Subcommands: `{PROG} run [...]` (this, the default), "
                                       f"`{PROG} train-teacher [...]` (the teacher), `{PROG} highres [...]` "
                                       f"(the cascade to 512 px) and `{PROG} lora [...]` (base-distilled CLEAR on a "
                                       "LoRA of the teacher); see their --help.")
    p.add_argument("--quick", action="store_true",
                   help="the reduced run: " + ", ".join(f"{k}={v}" for k, v in recipe.QUICK.items()))
    p.add_argument("--model", default=None, help="the teacher pipeline folder (default: ckpt/mini)")
    p.add_argument("--out", default=str(recipe.Settings.out), help="outputs folder (work files under OUT/work)")
    for name in RECIPE_OPTIONS:
        default = fields[name].default
        p.add_argument(f"--{name}", type=type(default), default=None,
                       help=f"default {default}" + (f" (--quick: {recipe.QUICK[name]})" if name in recipe.QUICK else ""))
    args = p.parse_args(argv)
    return recipe.make_settings(quick=args.quick, model=args.model, out=args.out,
                                **{name: getattr(args, name) for name in RECIPE_OPTIONS})


def parse_teacher_args(argv=None) -> teacher.TeacherConfig:
    d = teacher.TeacherConfig
    p = argparse.ArgumentParser(prog=f"{PROG} train-teacher",
                                description="Train the mini FLUX teacher on procedural scenes and save it.")
    p.add_argument("--out", default=str(d.out), help="where the trained FluxPipeline is saved")
    p.add_argument("--work-dir", default=str(d.work_dir),
                   help="checkpoints, logs and the encoded dataset (a rerun resumes from here)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-scenes", type=int, default=d.train_scenes)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-crop", type=int, default=d.vae_crop, help="VAE training crop in pixels (0: whole images)")
    p.add_argument("--vae-batch-size", type=int, default=d.vae_batch_size)
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--steps", type=int, default=d.steps, help="transformer training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--timesteps", choices=teacher.TIMESTEPS, default=d.timesteps,
                   help="noise-level distribution of transformer training (shifted as the scheduler shifts)")
    p.add_argument("--eval-scenes", type=int, default=d.eval_scenes)
    p.add_argument("--early-out-step", type=int, default=d.early_out_step,
                   help="also save the EMA pipeline to --out at the first checkpoint after this step (0: never)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads (0: torch's default). 1 is fastest on a shared 2-core machine: "
                        "with 2 threads each waits for the other whenever a core is taken")
    p.add_argument("--init-from", default=None,
                   help="continue from this teacher pipeline folder (its VAE, text encoders and transformer)")
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="keep the EMA weights at the first checkpoint past every N steps (0: never)")
    args = p.parse_args(argv)
    return teacher.TeacherConfig(**dict(vars(args), out=Path(args.out), work_dir=Path(args.work_dir),
                                        init_from=Path(args.init_from) if args.init_from else None))


def parse_curve_args(argv=None) -> dict:
    p = argparse.ArgumentParser(prog=f"{PROG} teacher-curve",
                                description=teacher.evaluate_snapshots.__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", required=True,
                   help="the teacher run's work dir (its snapshots/ema_<step>.safetensors)")
    p.add_argument("--n", type=int, default=200, help="held-out scenes per snapshot")
    p.add_argument("--seed", type=int, default=0, help="held-out scene and image seed")
    p.add_argument("--model", default=str(teacher.MINI_DIR),
                   help="the teacher pipeline the snapshots are loaded into (the run's --init-from or --out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    return {"work": Path(args.work_dir), "n": args.n, "seed": args.seed, "model": Path(args.model),
            "threads": args.threads}


def teacher_curve(argv) -> list[dict]:
    import torch

    options = parse_curve_args(argv)
    threads = options.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    return teacher.evaluate_snapshots(**options)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def parse_highres_args(argv=None) -> tuple[highres.HighresSettings, bool]:
    from clear.defaults import BACKEND_CHOICES

    d = highres.HighresSettings
    p = argparse.ArgumentParser(prog=f"{PROG} highres", description=highres.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the reduced run: " + ", ".join(f"{k}={v}" for k, v in highres.QUICK.items()))
    p.add_argument("--tune", action="store_true",
                   help="measure the teacher's cascade under one change at a time (strength, proportional "
                        "attention, NTK factor, shift) and write OUT/highres/tune.json instead")
    p.add_argument("--model", default=None, help="the teacher pipeline folder (default: ckpt/mini)")
    p.add_argument("--out", default=str(d.out),
                   help="the base run's folder: its distilled weights are used (trained first if absent); "
                        "results under OUT/highres")
    p.add_argument("--sizes", type=_ints, default=None, help=f"stage sizes in pixels, default {d.sizes}")
    p.add_argument("--strength", type=_floats, default=None, help=f"per stage, default {d.strength}")
    p.add_argument("--upscale_steps", type=_ints, default=None,
                   help=f"full schedule per stage (int(steps * strength) run), default {d.upscale_steps}")
    p.add_argument("--prompts", type=int, default=None, help=f"held-out prompts, default {d.prompts}")
    p.add_argument("--proportional", type=lambda x: x.lower() in ("1", "true", "yes"), default=None,
                   help=f"proportional attention (true/false), default {d.proportional}")
    p.add_argument("--ntk_factor", type=float, default=None, help=f"default {d.ntk_factor}")
    p.add_argument("--shift", type=float, default=None, help=f"a fixed scheduler shift, default {d.shift}")
    p.add_argument("--lowres_guidance", type=float, default=None,
                   help=f"weight of I-Max's projected flow in every stage (0: off), default {d.lowres_guidance}")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=f"CLEAR's backend, default {d.backend}")
    p.add_argument("--vae_tiling_latents", type=int, default=None,
                   help=f"diffusers' VAE tiling from this many latent cells (0: always), default {d.vae_tiling_latents}")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    fields = ("sizes", "strength", "upscale_steps", "prompts", "proportional", "ntk_factor", "shift",
              "lowres_guidance", "backend", "vae_tiling_latents", "seed", "threads")
    s = highres.make_settings(quick=args.quick, model=args.model, out=args.out,
                              **{k: getattr(args, k) for k in fields})
    return s, args.tune


def run_highres(argv) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    s, tune = parse_highres_args(argv)
    command = f"{PROG} highres " + " ".join(argv)
    if tune:
        return highres.tune(s, command=command.strip())
    metrics = highres.run(s, command=command.strip())
    print(highres_summary(metrics))
    return metrics


def highres_summary(metrics: dict) -> str:
    from clear.mini import highres_report

    lines = [*highres_report.table3(metrics), "", *highres_report.table7(metrics), "",
             *highres_report.time_split_table(metrics), ""]
    lines += [f"{'PASS' if b['pass'] else 'FAIL'}: {b['text']}: {b['value']}" for b in metrics["bars"].values()]
    return "\n".join(lines)


def _lora_field_type(default):
    if isinstance(default, bool):
        return lambda x: x.lower() in ("1", "true", "yes")
    return Path if isinstance(default, Path) else type(default)


def parse_lora_args(argv=None) -> lora.LoraSettings:
    """The options of `lora`: one per field of lora.LoraSettings (but ``quick``), spelt as the field."""
    p = argparse.ArgumentParser(prog=f"{PROG} lora", description=lora.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the reduced run: " + ", ".join(f"{k}={v}" for k, v in lora.QUICK.items()))
    defaults = lora.LoraSettings()
    for f in dataclasses.fields(lora.LoraSettings):
        if f.name == "quick":
            continue
        default = getattr(defaults, f.name)
        quick = f" (--quick: {lora.QUICK[f.name]})" if f.name in lora.QUICK else ""
        p.add_argument(f"--{f.name}", type=_lora_field_type(default), default=None, help=f"default {default}{quick}")
    args = vars(p.parse_args(argv))
    return lora.make_settings(**args)


def run_lora(argv) -> dict:
    s = parse_lora_args(argv)
    metrics = lora.run(s, command=f"{PROG} lora {' '.join(argv)}".strip())
    print(lora.summary(metrics))
    print(f"report: {Path(s.out) / 'report.md'}, grid: {Path(s.out) / 'grid.png'}")
    return metrics


def run_recipe(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    metrics = recipe.run(parse_recipe_args(argv))
    print(report.summary(metrics))
    return metrics


def train_teacher(argv) -> int:
    teacher.train(parse_teacher_args(argv), command=f"{PROG} train-teacher " + " ".join(argv))
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-teacher"]:
        return train_teacher(argv[1:])
    if argv[:1] == ["highres"]:
        return run_highres(argv[1:])
    if argv[:1] == ["teacher-curve"]:
        return teacher_curve(argv[1:])
    if argv[:1] == ["lora"]:
        return run_lora(argv[1:])
    return run_recipe(argv[1:] if argv[:1] == ["run"] else argv)


if __name__ == "__main__":
    main()
