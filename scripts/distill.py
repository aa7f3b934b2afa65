"""Distil a pretrained FLUX.1, SD3 / SD3.5, FLUX.2 or Qwen-Image transformer into CLEAR local attention.

    accelerate launch --config_file deepspeed_config.yaml scripts/distill.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --data_root data/flux_dev_1024 \
        --use_cached_prompt_embed --use_cached_latent --radius 16 --output_dir outputs/clear_local_16

(``bash distill.sh`` runs this with the 4xH100 defaults, as ``python scripts/distill.py --accelerate_config
deepspeed_config.yaml ...``: every check that needs no model runs first in that one process, a refusal is one
line before any worker starts, and a worker's failure ends the launcher with exit status 1 and its own one-line
message, without accelerate's ``CalledProcessError`` / ``ChildFailedError`` traceback.) The teacher is the
original transformer, frozen; the student is a copy with ``clear.apply_clear(radius,
down_factor)`` whose CLEAR parameters alone train, on ``L_fm + alpha*L_distill + beta*L_attn``
(see ``clear/distill.py``). The model family (FLUX.1, SD3 / SD3.5, FLUX.2, Qwen-Image) is read from the model's
``model_index.json`` / transformer config (or ``--model_family``); what differs between
families (text encoders, latent layout, how the transformer is called) lives in
``clear.families``. Every ``--checkpointing_steps`` the accelerate state goes to
``<output_dir>/checkpoint-<step>/`` together with the CLEAR weights in the released layout
(``clear_local_<r>[_down_<df>].safetensors``) and each process's data position; the final
weights are also written to ``<output_dir>/``. ``--resume_from_checkpoint latest``
continues at the same step, optimizer state and data position.

Before any model loads, ``main`` checks the data, the output folder (writable, locked by this
run) and, when resuming, that the checkpoint is complete and was written with this run's
settings and dataset (``clear.checkpointing``); every step stops on a non-finite loss or
gradient before anything of it is saved.

Reads top to bottom: arguments and checks (``main``), then ``train``: models, data,
optimizer, resume, the loop (loss, step, log, validation, checkpoint), export. Choosing,
restoring and saving checkpoints is ``clear.checkpointing.CheckpointManager``'s job; the data
stream and its position ``clear.data.TrainingBatches``'; validation images :class:`Validation`'s.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedType, InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list,
                               gather_object, set_seed)
from tqdm.auto import tqdm

import clear
from clear.checkpointing import (
    CheckpointError,
    CheckpointManager,
    NonFiniteError,
    OutputDirLock,
    check_writable,
    dataset_fingerprint,
)
from clear.data import LATENT_CODES, PROMPT_EMBEDS, DistillDataset, TrainingBatches, check_cache, default_cache_dir
from clear.distill import attention_layers, distill_losses, freeze_for_distillation, sample_timesteps
from clear.encoders import LatentEncoder, PromptEncoder, latents_from_moments, vae_scaling
from clear.families import FAMILIES, resolve_family
from clear.files import save_image
from clear.shards import index_samples

logger = logging.getLogger("distill")

# Settings a resumed run may change without altering the optimisation or the data order (any
# other change is refused unless --allow_changed_settings; max_train_steps only with a schedule
# that does not depend on it).
HARMLESS_SETTINGS = frozenset({
    "output_dir", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "allow_changed_settings",
    "report_to", "logging_dir", "validation_prompt", "validation_steps", "validation_resolution",
    "num_validation_inference_steps", "dataloader_num_workers", "data_root", "cache_dir", "attn_backend",
    "gradient_checkpointing", "allow_tf32", "max_train_steps", "accelerate_config"})
_SCHEDULES_WITHOUT_LENGTH = ("constant", "constant_with_warmup")
LOSSES = ("loss", "loss_fm", "loss_distill", "loss_attn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    # model and CLEAR
    a("--pretrained_model_name_or_path", default="black-forest-labs/FLUX.1-dev")
    a("--model_family", choices=["auto", *FAMILIES], default="auto",
      help="auto: read it from the model's model_index.json / transformer config")
    a("--radius", "--window_size", dest="radius", type=int, default=16, help="CLEAR window radius in tokens")
    a("--down_factor", type=int, default=1, help="add (H/df)x(W/df) pooled key/value tokens (1: none)")
    a("--attn_backend", choices=clear.backends.choices(), default="auto",
      help="auto: FlexAttention on CUDA, dense (mask + SDPA) elsewhere")
    # data
    a("--data_root", required=True, help="folder of .tar shards and/or <key>.jpg + <key>.json, or one .tar")
    a("--cache_dir", default=None, help="feature caches (default: <data_root>_cache)")
    a("--use_cached_prompt_embed", action="store_true",
      help="read the text encoders' embeddings (scripts/cache_prompt_embeds.py)")
    a("--use_cached_latent", action="store_true", help="read VAE mean/std from scripts/cache_latent_codes.py")
    a("--resolution", type=int, default=1024, help="training images are resized and centre-cropped to this")
    a("--max_sequence_length", type=int, default=None,
      help="text tokens per prompt (raw prompts and validation); default: the model's (FLUX.1-dev 512, "
           "FLUX.1-schnell 256, SD3 256, FLUX.2 512, Qwen-Image 512)")
    a("--dataloader_num_workers", type=int, default=2)
    # objective
    a("--distill_loss_weight", "--alpha", dest="alpha", type=float, default=0.5, help="alpha: weight of L_distill")
    a("--attn_loss_weight", "--beta", dest="beta", type=float, default=0.5, help="beta: weight of L_attn")
    a("--attn_loss_layers", default=None,
      help="attention layers of L_attn: 'single:N[:offset]', 'double:N[:offset]' (FLUX), 'joint:N[:offset]' (SD3), "
           "block or attention module names, or 'none'; default: FLUX 'single:4:1' (single blocks 1, 5, ..., 37 "
           "of FLUX.1-dev, the public release's choice), SD3 'joint:4', FLUX.2 'single:4:1', Qwen-Image 'double:4:1'")
    a("--guidance_scale", type=float, default=None,
      help="FLUX.1-dev / FLUX.2-dev: the guidance embedding value in training and validation (default 3.5 / 4); "
           "SD3, Qwen-Image: the classifier-free guidance of the validation images only (default 7 SD3, "
           "4.5 SD3.5-Medium, 3.5 SD3.5-Large, 4 Qwen-Image)")
    a("--weighting_scheme", choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"], default="none")
    a("--logit_mean", type=float, default=0.0)
    a("--logit_std", type=float, default=1.0)
    a("--mode_scale", type=float, default=1.29)
    # optimisation
    a("--train_batch_size", type=int, default=2, help="per process")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=10000)
    a("--optimizer", type=str.lower, choices=["adamw", "prodigy"], default="adamw")
    a("--learning_rate", type=float, default=1e-4, help="Prodigy: use 1.0")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-4)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--prodigy_beta3", type=float, default=None)
    a("--prodigy_decouple", action=argparse.BooleanOptionalAction, default=True)
    a("--prodigy_use_bias_correction", action=argparse.BooleanOptionalAction, default=True)
    a("--prodigy_safeguard_warmup", action=argparse.BooleanOptionalAction, default=True)
    a("--lr_scheduler", default="constant",
      help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup")
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--max_grad_norm", type=float, default=1.0, help="(DeepSpeed: the config's gradient_clipping when not 'auto')")
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: the accelerate config's")
    a("--gradient_checkpointing", action="store_true")
    a("--allow_tf32", action="store_true")
    a("--seed", type=int, default=0)
    # checkpoints, logs, validation
    a("--output_dir", default="outputs/clear")
    a("--checkpointing_steps", type=int, default=1000)
    a("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    a("--resume_from_checkpoint", default=None,
      help="a checkpoint folder, or 'latest' (the newest complete one; damaged newer ones are set aside)")
    a("--allow_changed_settings", action="store_true",
      help="resume even though settings that alter the optimisation or the data order (learning rate, seed, "
           "batch size, loss weights, ...) or the dataset differ from the checkpoint's; the changes are logged")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none")
    a("--logging_dir", default="logs", help="under output_dir")
    a("--validation_prompt", action="append", default=None, help="repeat for several prompts")
    a("--validation_steps", type=int, default=500)
    a("--validation_resolution", type=int, default=None, help="default: --resolution")
    a("--num_validation_inference_steps", type=int, default=28)
    a("--accelerate_config", default=None, metavar="CONFIG_YAML",
      help="launch the run with `accelerate launch --config_file CONFIG_YAML` after checking, in this process, "
           "everything that needs no model (data, caches, output folder, the checkpoint to resume): a refusal is "
           "one line, and a failed run exits 1 without the launcher's traceback")
    args = p.parse_args(argv)
    if args.checkpointing_steps < 1 or args.max_train_steps < 1:
        p.error("--checkpointing_steps and --max_train_steps must be >= 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        p.error("--checkpoints_total_limit must be >= 1")
    return args


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's noise and timesteps: a function of where it is, not of
    what ran before, so a resumed run draws exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def optimizer_settings(args) -> dict:
    """The optimizer's settings other than the learning rate (AdamW or Prodigy), as its constructor takes them."""
    settings = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                    eps=args.adam_epsilon)
    if args.optimizer == "prodigy":
        settings.update(beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                        use_bias_correction=args.prodigy_use_bias_correction,
                        safeguard_warmup=args.prodigy_safeguard_warmup)
    return settings


def needs_gloo() -> bool:
    """A distributed run (several processes, or DeepSpeed) without GPUs: NCCL cannot work, use gloo."""
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    return distributed and not torch.cuda.is_available()


def run_settings(args, num_processes: int) -> dict:
    """What a checkpoint records of the run that wrote it (compared on resume)."""
    return {**{k: v for k, v in vars(args).items()}, "num_processes": num_processes}


def side_by_side(teacher_images, student_images):
    """One row per prompt: teacher | student."""
    from PIL import Image  # here: PIL loads after --help

    w, h = teacher_images[0].size
    grid = Image.new("RGB", (2 * w, h * len(teacher_images)))
    for i, (t, s) in enumerate(zip(teacher_images, student_images)):
        grid.paste(t, (0, i * h))
        grid.paste(s, (w, i * h))
    return grid


def harmless_settings(args) -> frozenset:
    """The settings this run may change on resume without --allow_changed_settings."""
    if args.lr_scheduler in _SCHEDULES_WITHOUT_LENGTH:
        return HARMLESS_SETTINGS
    return HARMLESS_SETTINGS - {"max_train_steps"}  # the schedule's length


def check_inputs(args):
    """The model family, the sizes, the data and its caches, before anything loads: returns
    ``(family, dataset)``; fills in the family's defaults of ``args``. Exits with the problem."""
    try:
        family = resolve_family(args.model_family, args.pretrained_model_name_or_path)
        family.check_trains_from_data()
        for name, res in [("--resolution", args.resolution), ("--validation_resolution", args.validation_resolution)]:
            if res is not None:
                family.check_size(args.pretrained_model_name_or_path, res, args.down_factor, name)
        transformer_config = family.transformer_config(args.pretrained_model_name_or_path)
        family.check_text_length(args.max_sequence_length)
        if args.max_sequence_length is None:
            args.max_sequence_length = family.spec(transformer_config).max_sequence_length
        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.data_root)
        if args.use_cached_prompt_embed:
            check_cache(cache_dir, PROMPT_EMBEDS, family.name, max_sequence_length=args.max_sequence_length)
        if args.use_cached_latent:
            check_cache(cache_dir, LATENT_CODES, family.name, resolution=args.resolution)
        dataset = DistillDataset(index_samples(args.data_root), args.resolution, cache_dir,
                                 args.use_cached_prompt_embed, args.use_cached_latent, family.prompt_features)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # a bad --data_root, a missing cache, ...
        raise SystemExit(str(e)) from e
    if args.guidance_scale is None:
        args.guidance_scale = family.default_guidance_scale(transformer_config)
    if args.attn_loss_layers is None:
        args.attn_loss_layers = family.attn_loss_layers
    return family, dataset


def make_accelerator(args):
    """The accelerator (logging, trackers, gloo without GPUs), DeepSpeed's batch settings from ours, the seed."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if needs_gloo() else [],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = args.train_batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = args.max_grad_norm
        if ds.get("gradient_accumulation_steps", "auto") not in ("auto", args.gradient_accumulation_steps):
            raise SystemExit(f"the DeepSpeed config accumulates {ds['gradient_accumulation_steps']} steps but "
                             f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: set one of them "
                             "to match (or 'auto' in the config)")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    return accelerator


def take_output_dir(lock: OutputDirLock, accelerator) -> None:
    """The output folder is writable and this run's (its lock); every process exits if not."""
    problem = None
    if accelerator.is_main_process:
        try:
            check_writable(lock.path.parent)
            took_over = lock.acquire()
            if took_over:
                logger.warning(took_over)
        except CheckpointError as e:
            problem = str(e)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise SystemExit(problem)


class _PreflightProcesses:
    """What :class:`clear.checkpointing.CheckpointManager` asks of an accelerator, for the pre-flight of a
    launch: the main process of ``num_processes`` (the run that will start), with nothing to wait for."""

    is_main_process, process_index = True, 0

    def __init__(self, num_processes: int):
        self.num_processes = num_processes

    def wait_for_everyone(self) -> None:
        pass


def without_launch_flag(argv: list[str]) -> list[str]:
    """``argv`` less ``--accelerate_config X`` / ``--accelerate_config=X``: what the launched workers get."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--accelerate_config":
            skip = True
        elif not a.startswith("--accelerate_config="):
            out.append(a)
    return out


def launch(args, argv: list[str]) -> int:
    """``--accelerate_config``: the checks of :func:`main` that need no model, here, for the number of processes
    the config starts (a refusal exits with its one line); then ``accelerate launch --config_file ... --quiet`` of
    this script with ``argv`` (less the flag). A worker that fails has printed its own one line: the launcher
    exits with status 1 instead of raising (``CalledProcessError`` from one process, ``ChildFailedError`` from
    torch's elastic agent under several or DeepSpeed). Returns 0 when the run finished."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not Path(args.accelerate_config).is_file():
        raise SystemExit(f"--accelerate_config {args.accelerate_config} does not exist: pass an accelerate config "
                         "file (deepspeed_config.yaml, configs/*.yaml)")
    num_processes = load_config_from_file(args.accelerate_config).num_processes or 1
    family, dataset = check_inputs(args)
    lock = OutputDirLock(args.output_dir)
    try:
        check_writable(args.output_dir)
        lock.acquire()  # a live run holding it is refused here; the workers take it again
        lock.release()
        CheckpointManager(args.output_dir, _PreflightProcesses(num_processes), run_settings(args, num_processes),
                          dataset_fingerprint([s.id for s in dataset.samples]),
                          clear.Variant(args.radius, args.down_factor).filename, harmless=harmless_settings(args),
                          allow_changed=args.allow_changed_settings, log=logger
                          ).choose_resume(args.resume_from_checkpoint, args.data_root)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    finally:
        lock.release()
    launch_args = launch_command_parser().parse_args(["--config_file", args.accelerate_config, "--quiet", __file__,
                                                      *without_launch_flag(argv)])
    try:
        launch_command(launch_args)
    except (subprocess.CalledProcessError, ChildFailedError):
        sys.exit(1)  # the worker's message is above
    return 0


def main(argv=None) -> dict:
    """Arguments, the accelerator and every check that needs no model (family, sizes, data,
    caches, the output folder and its lock, the checkpoint to resume and its settings); then
    :func:`train`, holding the output folder's lock until it ends. ``--accelerate_config``: :func:`launch`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.accelerate_config:
        return {"launched": launch(args, argv)}
    family, dataset = check_inputs(args)
    accelerator = make_accelerator(args)
    lock = OutputDirLock(args.output_dir)
    try:
        take_output_dir(lock, accelerator)
        checkpoints = CheckpointManager(
            args.output_dir, accelerator, run_settings(args, accelerator.num_processes),
            dataset_fingerprint([s.id for s in dataset.samples]), clear.Variant(args.radius, args.down_factor).filename,
            keep=args.checkpoints_total_limit, harmless=harmless_settings(args),
            allow_changed=args.allow_changed_settings,
            deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED, log=logger)
        resume, data_state = checkpoints.choose_resume(args.resume_from_checkpoint, args.data_root)
        return train(args, accelerator, family, dataset, checkpoints, resume, data_state)
    except (CheckpointError, NonFiniteError) as e:
        raise SystemExit(str(e)) from e
    finally:
        lock.release()


def load_models(args, family, device, dtype, is_deepspeed: bool):
    """The frozen teacher, its copy with CLEAR whose CLEAR parameters alone train (fp32 unless DeepSpeed),
    and those parameters by name."""
    from diffusers.training_utils import cast_training_params  # here: diffusers loads after --help

    teacher = family.transformer_cls().from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                                       dtype=dtype).to(device)
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher)
    clear.apply_clear(student, radius=args.radius, down_factor=args.down_factor, backend=args.attn_backend)
    trainable = freeze_for_distillation(student)
    if not is_deepspeed:  # DeepSpeed keeps its own fp32 master copy of the trainable parameters
        cast_training_params(student, dtype=torch.float32)
    student.train()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return teacher, student, trainable


def make_optimizer(args, params, fsdp_in_use: bool):
    """AdamW or Prodigy over ``params`` with this run's settings (:func:`optimizer_settings`)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.learning_rate, **optimizer_settings(args))
    import prodigyopt  # here: optional: only --optimizer prodigy needs it

    # fsdp_in_use: ZeRO hands each process a shard of the parameters; Prodigy must all-reduce its step-size estimate
    return prodigyopt.Prodigy(params, lr=args.learning_rate, **optimizer_settings(args), fsdp_in_use=fsdp_in_use)


class BatchInputs:
    """A batch's model inputs: x0 latents [B, C, H, W] fp32 (sampled from the VAE moments with
    ``generator``), token text embeddings and the family's second text tensor (FLUX.1 / SD3 pooled
    text, Qwen-Image the text mask, FLUX.2 None); from the caches or encoded here."""

    def __init__(self, args, family, device, dtype):
        self.device, self.dtype, self.features = device, dtype, family.prompt_features
        self.prompt_encoder = None if args.use_cached_prompt_embed else PromptEncoder(
            args.pretrained_model_name_or_path, device, dtype, args.max_sequence_length, family)
        self.latent_encoder = None if args.use_cached_latent else LatentEncoder(
            args.pretrained_model_name_or_path, device, dtype, family)
        self.shift_factor, self.scaling_factor = vae_scaling(args.pretrained_model_name_or_path, family)

    def __call__(self, batch: dict, generator: torch.Generator):
        text = self.prompt_encoder(batch["prompt"]) if self.prompt_encoder else batch
        moments = (self.latent_encoder(batch["image"]) if self.latent_encoder
                   else {k: batch[k] for k in ("latent_mean", "latent_std")})
        x0 = latents_from_moments(moments["latent_mean"].to(self.device), moments["latent_std"].to(self.device),
                                  self.shift_factor, self.scaling_factor, generator)
        embeds, *second = (text[k].to(self.device, self.dtype if text[k].is_floating_point() else None)
                           for k in self.features)
        return x0, embeds, (second[0] if second else None)


class Validation:
    """The validation prompts through teacher and student with the same seeds, side by side:
    ``<output_dir>/validation/step-<N>.png`` and the trackers. The frozen teacher is rendered once."""

    def __init__(self, args, family, accelerator, teacher, noise_scheduler, inputs: BatchInputs):
        from diffusers.training_utils import free_memory

        self.args, self.family, self.accelerator, self.teacher = args, family, accelerator, teacher
        self.noise_scheduler, self.teacher_images = noise_scheduler, None
        device, dtype = accelerator.device, inputs.dtype
        encoder = inputs.prompt_encoder or PromptEncoder(args.pretrained_model_name_or_path, device, dtype,
                                                         args.max_sequence_length, family)
        self.text = encoder(args.validation_prompt, negative=True)
        self.vae = inputs.latent_encoder.vae if inputs.latent_encoder else family.vae_cls().from_pretrained(
            args.pretrained_model_name_or_path, subfolder="vae", dtype=dtype).to(device)
        del encoder
        free_memory()

    def render(self, transformer) -> list:
        args, device = self.args, self.accelerator.device
        pipe = self.family.pipeline(transformer, self.vae, copy.deepcopy(self.noise_scheduler))
        pipe.set_progress_bar_config(disable=True)
        size = args.validation_resolution or args.resolution
        with torch.no_grad(), self.accelerator.autocast():
            return [pipe(**{k: v[i: i + 1] for k, v in self.text.items()}, height=size, width=size,
                         **self.family.guidance_kwargs(args.guidance_scale, self.text),
                         num_inference_steps=args.num_validation_inference_steps,
                         generator=torch.Generator(device).manual_seed(args.seed + i)).images[0]
                    for i in range(len(args.validation_prompt))]

    def __call__(self, step: int, student) -> Path:
        if self.teacher_images is None:
            self.teacher_images = self.render(self.teacher)
        grid = side_by_side(self.teacher_images, self.render(student))
        path = save_image(grid, Path(self.args.output_dir) / "validation" / f"step-{step:06d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation (teacher | student)": np.asarray(grid)[None]}, step,
                                   dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"validation (teacher | student)": [grid]}, step)
        logger.info("validation images: %s", path)
        return path


def train(args, accelerator, family, dataset, checkpoints: CheckpointManager, resume: Path | None,
          data_state: dict | None) -> dict:
    """Models, data, optimizer, resume, the loop (loss, step, log, validation, checkpoint), export."""
    # here: diffusers loads after --help
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler

    is_main, rank, device = accelerator.is_main_process, accelerator.process_index, accelerator.device
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # -- models: frozen teacher, CLEAR student ---------------------------------------------
    teacher, student, trainable = load_models(args, family, device, weight_dtype, is_deepspeed)
    layers = attention_layers(student, args.attn_loss_layers)
    guidance = family.training_guidance(teacher.config, args.guidance_scale)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.pretrained_model_name_or_path,
                                                                      subfolder="scheduler")
    logger.info("%s student: %s; %d trainable tensors (%.1fM parameters); L_attn on %d layers (%s)", family.name,
                student.clear_state.core, len(trainable), sum(p.numel() for p in trainable.values()) / 1e6,
                len(layers), args.attn_loss_layers)

    # -- data (indexed and checked in main) -------------------------------------------------
    inputs = BatchInputs(args, family, device, weight_dtype)

    # -- optimizer and schedule (accelerate steps it once per process per optimizer step) ---
    params = [p for p in student.parameters() if p.requires_grad]
    sharded = is_deepspeed and accelerator.num_processes > 1 and torch.cuda.is_available()  # ZeRO shards the params
    optimizer = make_optimizer(args, params, fsdp_in_use=sharded)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(student)
    checkpoints.track(model)

    # -- resume (chosen and checked in main): model, optimizer, schedule, data position -----
    start_step = 0
    if resume is not None:
        start_step = checkpoints.restore(resume, lr_scheduler, args.learning_rate, optimizer_settings(args))
    batches = TrainingBatches(dataset, args.train_batch_size, args.seed, rank, accelerator.num_processes,
                              args.dataloader_num_workers, state=data_state, log=logger)
    validation = (Validation(args, family, accelerator, teacher, noise_scheduler, inputs)
                  if args.validation_prompt and is_main else None)

    # -- the loop ------------------------------------------------------------------------
    if is_main:
        accelerator.init_trackers("clear-distill", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                           for k, v in vars(args).items()})
    total = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    logger.info("%d samples; batch %d = %d per process x %d accumulation x %d processes; steps %d -> %d",
                len(dataset), total, args.train_batch_size, args.gradient_accumulation_steps,
                accelerator.num_processes, start_step, args.max_train_steps)
    history, n_bad, n_bad_here = [], 0, len(batches.bad)
    bar = tqdm(total=args.max_train_steps, initial=start_step, desc="distill",
               disable=not accelerator.is_local_main_process)
    for step in range(start_step, args.max_train_steps):
        sums = torch.zeros(4, device=device)
        for micro in range(args.gradient_accumulation_steps):
            batch = batches.next()
            generator = torch.Generator(device).manual_seed(step_seed(args.seed, step, micro, rank))
            with accelerator.accumulate(student):
                x0, prompt_embeds, pooled = inputs(batch, generator)
                noise = torch.randn(x0.shape, generator=generator, device=device)
                timesteps, sigmas = sample_timesteps(noise_scheduler, x0.shape[0], args.weighting_scheme,
                                                     args.logit_mean, args.logit_std, args.mode_scale, generator,
                                                     device)
                with accelerator.autocast():
                    losses = distill_losses(student, teacher, x0, noise, timesteps, sigmas, prompt_embeds, pooled,
                                            layers, guidance, args.alpha, args.beta, args.weighting_scheme,
                                            noise_scheduler.config.num_train_timesteps, student_module=model,
                                            family=family)
                accelerator.backward(losses.total)
                if accelerator.sync_gradients:  # the same global norm on every process: all stop together
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    checkpoints.check_step(step + 1, {"gradient norm": grad_norm})
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([losses.total, losses.fm, losses.distill, losses.attn]).detach().float()
        means = accelerator.reduce(sums / args.gradient_accumulation_steps, reduction="mean").tolist()
        means = dict(zip(LOSSES, means))
        global_step = step + 1
        checkpoints.check_step(global_step, means)
        if step == start_step or accelerator.reduce(torch.tensor(len(batches.bad) - n_bad_here, device=device),
                                                    "sum") > 0:
            n_bad = len(set(gather_object(batches.bad.ids())))  # distinct files over all processes
        n_bad_here = len(batches.bad)
        logs = dict(means, lr=lr_scheduler.get_last_lr()[0], bad_samples=n_bad)
        history.append(logs)
        accelerator.log(logs, step=global_step)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
        last = global_step == args.max_train_steps
        if args.validation_prompt and (global_step % args.validation_steps == 0 or last):
            if validation is not None:
                validation(global_step, model)
            accelerator.wait_for_everyone()
        if global_step % args.checkpointing_steps == 0 or last:
            checkpoints.save(global_step, batches.state_dict())
    bar.close()

    # -- export --------------------------------------------------------------------------
    weights = checkpoints.export(max(start_step, args.max_train_steps))
    if len(batches.bad):
        logger.warning("process %d: %s", rank, batches.bad.report())
    accelerator.end_training()
    return {"start_step": start_step, "global_step": max(start_step, args.max_train_steps), "history": history,
            "weights": str(weights), "bad_samples": batches.bad, "student": model}


if __name__ == "__main__":
    main()
