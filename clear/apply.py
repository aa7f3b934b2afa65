"""Put CLEAR on a stock diffusers model, and take it off again.

:func:`apply_clear` replaces every attention processor of the model with a CLEAR one
sharing one :class:`ClearAttention`, and registers a forward pre-hook that reads the
image grid from each forward's own inputs (FLUX: ``img_ids``, SD3: the latent shape),
finds or builds the plan of each attention layout of that forward, and leaves both on the
model's :class:`ClearState` for the processors (and for blocks that gradient checkpointing
re-runs in the backward). Each forward replaces them, so resolutions and batch sizes change
freely; the per-layout plan cache is bounded.

``torch.compile``: the hook is ``torch.compiler.disable``d. ``torch.compile(model)``,
``model.compile()`` and ``compile_repeated_blocks()`` run a module's hooks outside its
compiled frame, so they read ``img_ids`` eagerly and no plan is built in compiled code.
The processors reach grid and plans through module attributes, which dynamo specialises:
it guards on the grid's ints (one graph per resolution, reused when the resolution comes
back) and takes the plans' tensors as inputs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .attention import ClearAttention
from .families import ModelFamily, ModelSpec, family_of
from .processors import ClearProcessorBase


@dataclass
class ClearState:
    """What :func:`apply_clear` attaches to a model (as ``model.clear_state``)."""

    core: ClearAttention
    family: ModelFamily  # everything family-specific: grid reader, text layouts, block names (``.name``)
    spec: ModelSpec  # the released model: its training length is the L0 of proportional attention
    original_processors: dict
    hooks: list
    # Image grid of the latest forward and its attention plans by text length (plans None: each call
    # looks its plan up). They stay after the forward: gradient checkpointing re-runs blocks in backward.
    grid: tuple[int, int] | None = None
    plans: dict | None = None
    # Where the joint sequence is not [text | image] as it is (reference images, padded text): how it becomes
    # CLEAR's [global | image] layout (clear.processors.Arrangement), else None
    arrangement: object | None = None
    declared_repeated_blocks: bool = False  # apply_clear set the model's _repeated_blocks (regional compilation)

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


def _forward_plans(module, state: ClearState, bound: inspect.BoundArguments, grid, text_lens) -> dict | None:
    """The plan of every attention layout of this forward, by text length (``None`` when
    patch parallelism replaced the attention: its bands have their own plans)."""
    if getattr(module, "clear_parallel", None) is not None:
        return None
    family = state.family
    with_grad = torch.is_grad_enabled() and (
        any(isinstance(t, torch.Tensor) and t.requires_grad for t in bound.arguments.values())
        or any(p.requires_grad for p in module.parameters()))
    device = bound.arguments["hidden_states"].device
    return {t: state.core.layout_plan(family.layout(t, grid), device, with_grad) for t in text_lens}


@torch.compiler.disable  # runs eagerly, outside the compiled frame: see the module docstring
def _grid_hook(module, args, kwargs):
    state: ClearState = module.clear_state
    bound = forward_signature(type(module)).bind_partial(module, *args, **kwargs)
    grid = state.family.grid(bound)
    state.family.layout(0, grid).pooled_grid(state.core.window)  # fail before any block runs
    arrangement = state.family.arrangement(bound, grid)
    text_lens = arrangement.text_lens if arrangement is not None else state.family.text_lens(bound)
    state.plans = _forward_plans(module, state, bound, grid, text_lens)
    state.grid, state.arrangement = grid, arrangement


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
        new[name] = family.processor(core, state).to(device=ref.device, dtype=ref.dtype)
    transformer.set_attn_processor(new)
    state.hooks.append(transformer.register_forward_pre_hook(_grid_hook, with_kwargs=True))
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
