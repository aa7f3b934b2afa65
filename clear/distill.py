"""The distillation objective: a CLEAR student learns from the full-attention teacher.

``loss = L_fm + alpha * L_distill + beta * L_attn`` on one noisy input shared by both models:

* ``L_fm``: flow matching, the student's prediction against ``noise - x0``;
* ``L_distill``: the student's prediction against the teacher's;
* ``L_attn``: the student's attention-layer outputs against the teacher's, on a chosen set
  of layers (default: FLUX every 4th single-stream block from the second, as the public release
  trains FLUX.1-dev; SD3 every 4th joint block's ``attn``),
  captured by forward hooks that live only for the duration of one forward
  (:class:`AttentionCapture`), never in module globals.

What differs between model families (how the transformer takes noisy latents, timesteps and
text, the layout it predicts in, its block streams) comes from its family (:mod:`clear.families`),
chosen by the teacher's class; the objective itself is the same for FLUX and SD3 / SD3.5.

All three are weighted per sample with diffusers' SD3/FLUX ``compute_loss_weighting_for_sd3``,
and timesteps are drawn with ``compute_density_for_timestep_sampling``. Only the parameters
a CLEAR checkpoint holds train (:func:`freeze_for_distillation`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .apply import clear_attention_modules
from .families import ModelFamily, family_of
from .weights import clear_state_dict_keys


def attention_layers(transformer: torch.nn.Module, spec: str | None = None) -> list[str]:
    """Names of the attention modules whose outputs enter ``L_attn``.

    ``spec`` is a comma-separated list of ``single:N[:offset]`` / ``double:N[:offset]`` /
    ``joint:N[:offset]`` (the ``attn`` of every N-th single-stream / double-stream (FLUX) or
    joint (SD3, the same as double) block, starting at ``offset``, default 0), block names
    (``single_transformer_blocks.3``: its ``attn``) or attention module names (also SD3.5's
    image-only ``transformer_blocks.0.attn2``); ``none`` selects nothing. Default (``None``):
    the family's, FLUX ``single:4:1``, SD3 ``joint:4``. FLUX's is the public CLEAR release's
    choice: the attention modules whose index among all of FLUX.1-dev's 57 (19 double, then
    38 single blocks) is divisible by 4, i.e. single blocks 1, 5, ..., 37.
    """
    family = family_of(transformer)
    if spec is None:
        spec = family.attn_loss_layers
    modules = [n for n, m in transformer.named_modules() if hasattr(m, "processor")]
    attn_names = [n for n in modules if n.endswith("." + family.block_attention)]  # Wan: a block's attn1
    if spec.strip().lower() in ("", "none"):
        return []
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        m = re.fullmatch(r"(\w+):(\d+)(?::(\d+))?", item)
        if m:
            prefix, every, offset = family.stream_blocks(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
            if every < 1:
                raise ValueError(f"attention layer spec {item!r}: the step must be >= 1")
            found = [n for n in attn_names if prefix is not None and n.startswith(prefix + ".")]
            found = [n for n in found if (i := int(n.split(".")[1])) >= offset and (i - offset) % every == 0]
        else:
            name = item if item in modules else f"{item}.{family.block_attention}"
            found = [name] if name in modules else []
        if not found:
            streams = ", ".join(f"'{stream}:4'" for stream, _ in family.streams)
            raise ValueError(f"attention layer spec {item!r} selects no attention module of this {family.name} model; "
                             f"use a stream every N blocks ({streams}; 'STREAM:N:OFFSET' starts at block OFFSET), "
                             f"an attention module's name (e.g. {attn_names[0] if attn_names else 'blocks.0.attn'!r}) "
                             "or 'none'")
        chosen += [n for n in found if n not in chosen]
    return chosen


class AttentionCapture:
    """Records the outputs of the named attention modules during one forward.

    ``with AttentionCapture(model, names) as outputs: model(...)`` leaves ``outputs[name]``
    holding each module's output (a tuple output, FLUX double-stream ``(image, text)``,
    is concatenated along the sequence). Hooks exist only inside the ``with`` block, so a
    gradient-checkpointing recomputation during backward records nothing."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.model, self.names = model, list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name):
        def hook(module, args, output):
            if name in self.outputs:
                raise RuntimeError(f"{name} ran twice in one captured forward")
            self.outputs[name] = torch.cat(list(output), dim=1) if isinstance(output, tuple) else output

        return hook

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.outputs = {}
        self._handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]
        return self.outputs

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc[0] is None:
            missing = [n for n in self.names if n not in self.outputs]
            if missing:
                raise RuntimeError(f"attention modules {missing} did not run in the captured forward")


def freeze_for_distillation(student: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the CLEAR parameters (``to_q/to_k/to_v/to_out.0`` of every
    attention module, and ``spatial_weight``); return those, by checkpoint key."""
    clear_attention_modules(student)  # fails clearly when CLEAR is not applied
    student.requires_grad_(False)
    params = clear_state_dict_keys(student)
    for p in params.values():
        p.requires_grad_(True)
    return params


def sample_timesteps(scheduler, batch_size: int, weighting_scheme: str = "none", logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29, generator: torch.Generator | None = None,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)`` drawn as diffusers' SD3/FLUX training scripts do: a density
    sample ``u`` in [0, 1) picks one of the scheduler's training timesteps."""
    from diffusers.training_utils import compute_density_for_timestep_sampling  # here: diffusers loads after --help

    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=batch_size,
                                              logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                                              device=device, generator=generator)
    n = scheduler.config.num_train_timesteps
    idx = (u * n).long().clamp(0, n - 1).cpu()
    return scheduler.timesteps[idx].to(device), scheduler.sigmas[idx].to(device)


@dataclass
class DistillLosses:
    total: torch.Tensor
    fm: torch.Tensor
    distill: torch.Tensor
    attn: torch.Tensor

    def items(self) -> dict[str, float]:
        return {"loss": self.total.item(), "loss_fm": self.fm.item(), "loss_distill": self.distill.item(),
                "loss_attn": self.attn.item()}


def _weighted_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (weight * per_sample).mean()


def distill_losses(student, teacher, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   sigmas: torch.Tensor, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                   layers: list[str], guidance: float | None = 3.5, alpha: float = 0.5, beta: float = 0.5,
                   weighting_scheme: str = "none", num_train_timesteps: int = 1000,
                   student_module: torch.nn.Module | None = None,
                   family: ModelFamily | None = None) -> DistillLosses:
    """The three losses for one batch. ``x0``, ``noise``: ``[B, C, H, W]`` latents (video: ``[B, C, T, H, W]``);
    ``sigmas``/``timesteps``: ``[B]`` (``timesteps = sigmas * num_train_timesteps``, the
    scheduler's). ``student`` may be a wrapper (DDP, DeepSpeed) whose underlying model is
    ``student_module``; hooks go on that. The teacher runs without grad. ``family``: how the
    transformer is called (default: the teacher's); ``guidance`` is the embedded guidance
    value, for models that have one (FLUX.1-dev), ignored by SD3."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3  # here: diffusers loads after --help

    family = family or family_of(teacher)
    s = sigmas.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)  # [B, C, H, W] latents, or video [B, C, T, H, W]
    noisy = (1.0 - s) * x0 + s * noise
    inputs = family.transformer_inputs(noisy, timesteps, prompt_embeds, pooled_prompt_embeds, guidance,
                                       num_train_timesteps)
    with torch.no_grad(), AttentionCapture(teacher, layers) as teacher_attn:
        teacher_pred = teacher(**inputs)[0]
    with AttentionCapture(student_module if student_module is not None else student, layers) as student_attn:
        student_pred = student(**inputs)[0]

    weight = compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float()).float()
    fm = _weighted_mse(student_pred, family.output_layout(noise - x0), weight)
    distill = _weighted_mse(student_pred, teacher_pred, weight)
    if layers:
        attn = sum(_weighted_mse(student_attn[n], teacher_attn[n], weight) for n in layers) / len(layers)
    else:
        attn = torch.zeros((), device=fm.device)
    return DistillLosses(fm + alpha * distill + beta * attn, fm, distill, attn)
