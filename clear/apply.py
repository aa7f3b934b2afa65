"""Put CLEAR on a stock diffusers model, and take it off again.

:func:`apply_clear` replaces every attention processor of the model with a CLEAR one
sharing one :class:`ClearAttention`, and registers a forward pre-hook that makes each forward's
:class:`clear.processors.ForwardPlan` from that forward's own inputs (:func:`plan_forward`: the
image grid from FLUX's ``img_ids`` or SD3's latent shape, the plan of each attention layout from the
per-layout cache) and hands it to every processor call of that forward in the attention kwargs that
diffusers passes to its blocks (``joint_attention_kwargs``; the keyword ``clear_forward``). Nothing
of a forward stays on the model: blocks that gradient checkpointing re-runs in the backward get their
own forward's plan with their arguments, so resolutions and batch sizes change freely, even between two
forwards and one backward. (A model whose forward hands no attention kwargs to its blocks, FLUX.1's
ControlNet or Wan, reads the forward in progress instead; its gradient checkpointing function is wrapped so
that a block re-run in the backward runs with its own forward's plan again:
:meth:`clear.processors.InProgress.replaying`.)

``torch.compile``: the hook is ``torch.compiler.disable``d. ``torch.compile(model)``,
``model.compile()`` and ``compile_repeated_blocks()`` run a module's hooks outside its
compiled frame, so they read ``img_ids`` eagerly and no plan is built in compiled code.
The processors get the forward plan as an argument, which dynamo specialises: it guards on the
grid's ints (one graph per resolution, reused when the resolution comes back) and takes the
plans' tensors as inputs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch

from .attention import ClearAttention
from .families import ModelFamily, ModelSpec, family_of
from .processors import FORWARD_KWARG, ClearProcessorBase, ForwardPlan, InProgress


@dataclass
class ClearState:
    """What :func:`apply_clear` attaches to a model (as ``model.clear_state``)."""

    core: ClearAttention
    family: ModelFamily  # everything family-specific: grid reader, text layouts, block names (``.name``)
    spec: ModelSpec  # the released model: its training length is the L0 of proportional attention
    original_processors: dict
    hooks: list
    declared_repeated_blocks: bool = False  # apply_clear set the model's _repeated_blocks (regional compilation)
    # Only read for a model whose forward hands no attention kwargs to its blocks (FLUX.1's ControlNet, Wan): the
    # plan of the forward in progress, shared with its processors
    in_progress: InProgress = field(default_factory=InProgress)

    @property
    def radius(self):
        return self.core.window.radius

    @property
    def down_factor(self):
        return self.core.window.down_factor

    @property
    def temporal_radius(self):
        return self.core.window.temporal_radius


def model_family(model: torch.nn.Module) -> str:
    """The name of the model family of a transformer or ControlNet (:func:`clear.families.family_of`)."""
    return family_of(model).name


@functools.cache
def forward_signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def forward_plan(module: torch.nn.Module, bound: inspect.BoundArguments, plans: bool = True) -> ForwardPlan:
    """The :class:`ForwardPlan` of one forward of ``module`` (a model :func:`apply_clear` made CLEAR), from its
    bound arguments: the grid, the arrangement and, with ``plans``, the plan of every attention layout
    (:meth:`ClearAttention.plan`: each layout checked and its backend logged when its plan is built, once per
    layout; a layout that cannot be planned fails here, before any block runs)."""
    state: ClearState = module.clear_state
    family = state.family
    grid = family.grid(bound)
    arrangement = family.arrangement(bound, grid)
    text_lens = arrangement.text_lens if arrangement is not None else family.text_lens(bound)
    by_text = dict.fromkeys(text_lens)
    if plans:
        with_grad = torch.is_grad_enabled() and (
            any(isinstance(t, torch.Tensor) and t.requires_grad for t in bound.arguments.values())
            or any(p.requires_grad for p in module.parameters()))
        device = bound.arguments["hidden_states"].device
        by_text = {t: state.core.plan(family.layout(t, grid), device, with_grad)
                   for t in text_lens}
    return ForwardPlan(tuple(grid), family.text_first, by_text, arrangement)


def plan_forward(module: torch.nn.Module, *args, **kwargs) -> ForwardPlan:
    """The :class:`ForwardPlan` that ``module(*args, **kwargs)`` would run with (what its attention calls use)."""
    return forward_plan(module, forward_signature(type(module)).bind_partial(module, *args, **kwargs))


@torch.compiler.disable  # runs eagerly, outside the compiled frame: see the module docstring
def _plan_hook(module, args, kwargs):
    """Before each forward: its plan, into the attention kwargs its blocks hand to every processor (one that
    a caller already put there, e.g. patch parallelism's bands, is kept)."""
    state: ClearState = module.clear_state
    bound = forward_signature(type(module)).bind_partial(module, *args, **kwargs)
    name = state.family.attention_kwargs(module)
    given = dict(bound.arguments.get(name) or {}) if name else {}
    forward = given.get(FORWARD_KWARG)
    if forward is None:
        forward = forward_plan(module, bound)
    if name is None:
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            # blocks re-run in the backward get their own forward's plan back (InProgress.replaying)
            module._gradient_checkpointing_func = state.in_progress.replaying(func)
        state.in_progress.plan = forward
        return None
    bound.arguments[name] = {**given, FORWARD_KWARG: forward}
    return bound.args[1:], bound.kwargs


def _end_hook(module, args, kwargs, output):
    module.clear_state.in_progress.plan = None


def _head_dim(attn: torch.nn.Module) -> int | None:
    """The head size of a diffusers attention module (``auto``'s choice depends on it)."""
    if getattr(attn, "head_dim", None):
        return int(attn.head_dim)
    inner = getattr(attn, "inner_dim", None)
    return inner // attn.heads if inner and getattr(attn, "heads", None) else None


def apply_clear(transformer: torch.nn.Module, radius: float | None, down_factor: int = 1, backend: str = "auto",
                proportional_attention: bool = False, tile: tuple[int, int] = (8, 16),
                kernel_options: dict | None = None, temporal_radius: float | None = None) -> ClearAttention:
    """Make every attention layer of ``transformer`` CLEAR attention, in place.

    ``radius``: window radius in tokens (image keys with dy^2 + dx^2 < radius^2 are
    seen); ``None`` keeps full attention (useful with ``proportional_attention``).
    ``down_factor``: add (H/df)*(W/df) pooled key/value tokens with learned weights.
    ``backend``: a registered backend (:func:`clear.backends.choices`: ``"dense"``, mask + SDPA, the
    oracle; ``"flex"``, block-sparse FlexAttention; ``"tiled"``, query tiles with gathered key windows
    in one batched SDPA) or ``"auto"`` (decided per call shape, :func:`clear.backends.decide`: from
    shipped measurements on CPU, flex on CUDA; logged once per layout). Applying again replaces the previous
    CLEAR configuration. The model's family (:func:`clear.families.family_of`) gives the processor
    and the grid reader; its spec (the released model) the L0 of proportional attention, the
    model's training length. Returns the shared :class:`ClearAttention`.

    Video families (Wan, ``family.video``): ``temporal_radius`` in latent frames makes the window an ellipsoid,
    ``((t-t')/rt)^2 + ((y-y')/r)^2 + ((x-x')/r)^2 < 1`` (``None``: every frame); only the modules the family
    names (:meth:`clear.families.ModelFamily.clear_module`: Wan's self-attention) get CLEAR, the others keep
    their processors. Image families refuse a ``temporal_radius``."""
    family = family_of(transformer)
    if temporal_radius is not None and not family.video:
        raise ValueError(f"temporal_radius={temporal_radius!r} is for video models, but {type(transformer).__name__} "
                         f"is a {family.name} image model (no frames): drop temporal_radius")
    spec = family.spec(transformer.config)
    if getattr(transformer, "clear_state", None) is not None:
        remove_clear(transformer)
    core = ClearAttention(radius, down_factor, backend, proportional_attention, tile, kernel_options=kernel_options,
                          training_tokens=spec.training_tokens, temporal_radius=temporal_radius)
    originals = dict(transformer.attn_processors)
    state = ClearState(core, family, spec, originals, [])
    new = {}
    for name in originals:
        if not family.clear_module(name):  # e.g. Wan's cross-attention: unchanged
            new[name] = originals[name]
            continue
        attn = transformer.get_submodule(name.rsplit(".processor", 1)[0])
        core.heads, core.head_dim = core.heads or attn.heads, core.head_dim or _head_dim(attn)
        ref = next(attn.parameters())  # to_q's, or FLUX.2's fused to_qkv_mlp_proj's
        new[name] = family.processor(core, state.in_progress).to(device=ref.device, dtype=ref.dtype)
    transformer.set_attn_processor(new)
    state.hooks.append(transformer.register_forward_pre_hook(_plan_hook, with_kwargs=True))
    if family.attention_kwargs(transformer) is None:
        state.hooks.append(transformer.register_forward_hook(_end_hook, with_kwargs=True, always_call=True))
    if not getattr(transformer, "_repeated_blocks", None):
        transformer._repeated_blocks = list(family.repeated_blocks)  # on the instance; remove_clear drops it
        state.declared_repeated_blocks = True
    transformer.clear_state = state
    return core


def remove_clear(transformer: torch.nn.Module) -> None:
    """Restore the processors the model had before :func:`apply_clear` (the same objects)."""
    state = getattr(transformer, "clear_state", None)
    if state is None:
        raise ValueError("this model has no CLEAR attention to remove")
    for hook in state.hooks:
        hook.remove()
    func = getattr(transformer, "_gradient_checkpointing_func", None)
    if getattr(func, "in_progress", None) is state.in_progress:  # InProgress.replaying's wrapper: unwrapped
        transformer._gradient_checkpointing_func = func.func
    if state.declared_repeated_blocks:
        del transformer._repeated_blocks
    transformer.set_attn_processor(dict(state.original_processors))
    transformer.clear_state = None


def clear_attention_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention modules of the model that run CLEAR, by qualified name."""
    if getattr(transformer, "clear_state", None) is None:
        raise ValueError("CLEAR is not applied to this model: call clear.apply_clear(transformer, radius=...) first")
    return {name: m for name, m in transformer.named_modules()
            if isinstance(getattr(m, "processor", None), ClearProcessorBase)}
