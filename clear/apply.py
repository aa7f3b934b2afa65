"""Put CLEAR on a stock diffusers model, and take it off again.

:func:`apply_clear` replaces every attention processor of the model with a CLEAR one
sharing one :class:`ClearAttention`, and registers a forward pre-hook that reads the
image grid from each forward's own inputs (FLUX: ``img_ids``) and hands it to the
processors through ``joint_attention_kwargs``. Nothing is kept between forwards but the
per-layout mask cache, so resolutions and batch sizes change freely.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .attention import ClearAttention
from .geometry import TokenLayout, grid_from_ids
from .processors import ClearProcessorBase, FluxClearAttnProcessor, SD3ClearAttnProcessor


@dataclass
class ClearState:
    """What :func:`apply_clear` attaches to a model (as ``model.clear_state``)."""

    core: ClearAttention
    family: str
    original_processors: dict
    hooks: list
    grid: tuple[int, int] | None = None  # image grid of the latest forward (for block-level hooks)

    @property
    def radius(self):
        return self.core.window.radius

    @property
    def down_factor(self):
        return self.core.window.down_factor


def _flux_grid(bound: inspect.BoundArguments) -> tuple[int, int]:
    img_ids = bound.arguments.get("img_ids")
    if img_ids is None:
        raise ValueError("CLEAR needs img_ids in the FLUX forward to know the image grid")
    return grid_from_ids(img_ids)


def _sd3_grid(bound: inspect.BoundArguments) -> tuple[int, int]:
    model, latents = bound.arguments["self"], bound.arguments["hidden_states"]
    p = model.config.patch_size
    height, width = latents.shape[-2:]
    if height % p or width % p:
        raise ValueError(f"the latent size {height}x{width} is not divisible by the patch size {p}")
    return height // p, width // p


# family name -> (processor class, function reading the grid from the forward's arguments,
# tokens of one attention call at the training resolution 1024²: the L0 of proportional attention)
_FAMILIES = {
    "flux": (FluxClearAttnProcessor, _flux_grid, 64 * 64 + 512),  # T5 512
    "sd3": (SD3ClearAttnProcessor, _sd3_grid, 64 * 64 + 77 + 256),  # CLIP 77 + T5 256
}
_CLASS_FAMILY = {
    "FluxTransformer2DModel": "flux",
    "FluxControlNetModel": "flux",
    "SD3Transformer2DModel": "sd3",
}
# Models whose forward does not hand joint_attention_kwargs to their blocks: the grid is
# injected into each block's call instead.
_BLOCK_LEVEL = {"FluxControlNetModel"}


def model_family(model: torch.nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in _CLASS_FAMILY:
            return _CLASS_FAMILY[cls.__name__]
    raise TypeError(
        f"CLEAR does not support {type(model).__name__}; supported: {', '.join(sorted(_CLASS_FAMILY))}"
    )


@functools.cache
def _forward_signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _grid_hook(module, args, kwargs):
    state: ClearState = module.clear_state
    sig = _forward_signature(type(module))
    bound = sig.bind_partial(module, *args, **kwargs)
    grid = _FAMILIES[state.family][1](bound)
    TokenLayout(0, *grid).pooled_grid(state.core.window)  # fail before any block runs
    state.grid = grid
    jak = dict(bound.arguments.get("joint_attention_kwargs") or {})
    jak["clear_grid"] = grid
    pos = list(sig.parameters).index("joint_attention_kwargs") - 1  # without self
    if pos < len(args):
        args = args[:pos] + (jak,) + args[pos + 1 :]
    else:
        kwargs = {**kwargs, "joint_attention_kwargs": jak}
    return args, kwargs


def _block_grid_hook(state: ClearState):
    def hook(module, args, kwargs):
        jak = dict(kwargs.get("joint_attention_kwargs") or {})
        jak["clear_grid"] = state.grid
        return args, {**kwargs, "joint_attention_kwargs": jak}

    return hook


def apply_clear(transformer: torch.nn.Module, radius: float | None, down_factor: int = 1, backend: str = "auto",
                proportional_attention: bool = False, tile: tuple[int, int] = (8, 16),
                kernel_options: dict | None = None) -> ClearAttention:
    """Make every attention layer of ``transformer`` CLEAR attention, in place.

    ``radius``: window radius in tokens (image keys with dy^2 + dx^2 < radius^2 are
    seen); ``None`` keeps full attention (useful with ``proportional_attention``).
    ``down_factor``: add (H/df)*(W/df) pooled key/value tokens with learned weights.
    ``backend``: ``"dense"`` (mask + SDPA, the oracle), ``"flex"`` (tiled FlexAttention)
    or ``"auto"`` (flex on CUDA, dense elsewhere). Applying again replaces the previous
    CLEAR configuration. Returns the shared :class:`ClearAttention`."""
    family = model_family(transformer)
    if getattr(transformer, "clear_state", None) is not None:
        remove_clear(transformer)
    core = ClearAttention(radius, down_factor, backend, proportional_attention, tile, kernel_options=kernel_options,
                          training_tokens=_FAMILIES[family][2])
    processor_cls = _FAMILIES[family][0]
    originals = dict(transformer.attn_processors)
    new = {}
    for name in originals:
        attn = transformer.get_submodule(name.rsplit(".processor", 1)[0])
        ref = attn.to_q.weight
        new[name] = processor_cls(core).to(device=ref.device, dtype=ref.dtype)
    transformer.set_attn_processor(new)
    state = ClearState(core, family, originals, [])
    state.hooks.append(transformer.register_forward_pre_hook(_grid_hook, with_kwargs=True))
    if any(cls.__name__ in _BLOCK_LEVEL for cls in type(transformer).__mro__):
        for name, block in transformer.named_modules():
            if name.count(".") == 1 and name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks"):
                state.hooks.append(block.register_forward_pre_hook(_block_grid_hook(state), with_kwargs=True))
    transformer.clear_state = state
    return core


def remove_clear(transformer: torch.nn.Module) -> None:
    """Restore the processors the model had before :func:`apply_clear` (the same objects)."""
    state = getattr(transformer, "clear_state", None)
    if state is None:
        raise ValueError("this model has no CLEAR attention to remove")
    for hook in state.hooks:
        hook.remove()
    transformer.set_attn_processor(dict(state.original_processors))
    transformer.clear_state = None


def clear_attention_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention modules of the model that run CLEAR, by qualified name."""
    if getattr(transformer, "clear_state", None) is None:
        raise ValueError("CLEAR is not applied to this model: call clear.apply_clear(transformer, radius=...) first")
    return {name: m for name, m in transformer.named_modules()
            if isinstance(getattr(m, "processor", None), ClearProcessorBase)}
