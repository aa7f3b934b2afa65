"""What every attention backend is made of: :class:`Backend` (its functions and its constraints, registered
next to its code as ``BACKEND`` at the end of its module), :class:`Options` (what a model's CLEAR attention
hands every plan) and :class:`Call` (what a call is, for the constraints and for ``auto``).

A backend module (``clear/backends/<name>.py``) provides three functions, all on ``[B, S, heads, D]`` tensors:

* ``grid_plan(layout, window, device, options, with_grad) -> plan``: a whole grid
  (:class:`clear.geometry.TokenLayout`): queries are the call's tokens in natural order, keys are
  ``[natural order | pooled]`` (pooled tokens only when ``down_factor > 1``);
* ``band_plan(band, window, device, options) -> plan``: a patch-parallel band
  (:class:`clear.geometry.BandLayout`): queries are the band's image tokens (row-major), keys are
  ``[text | band with its halo rows | pooled]``;
* ``attend(query, key, value, scale, *, return_lse=False, options=Options())``: unmasked attention (the
  text queries of patch parallelism).

Each plan has ``plan.attend(query, key, value, scale, return_lse=False)`` and the fields ``layout`` and
``backend`` (its registered name). With ``return_lse`` the call returns ``(out, lse)``: ``out [B, S, heads,
D]`` and the log-sum-exp of the scaled logits ``lse [B, S, heads]``, both float32 (for merging partial
softmaxes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

# The backend every other one is tested against: runs on every device, with a backward, and plans full
# attention (radius None) too; ``auto``'s last resort and the one fall-back.
REFERENCE = "dense"


@dataclass(frozen=True)
class Options:
    """What a :class:`clear.ClearAttention` hands every plan: ``tile`` (image tokens of one
    FlexAttention block, ``(rows, cols)``), ``kernel_options`` (of the compiled FlexAttention
    kernel), ``compiled`` (run a compiled kernel even off CUDA) and ``query_tile`` (the ``tiled``
    backend's query tile, ``None``: its measured rule). A backend ignores the ones it has no use for."""

    tile: tuple[int, int] = (8, 16)
    kernel_options: dict | None = field(default=None, compare=False, hash=False)
    compiled: bool = False
    query_tile: tuple[int, int] | None = None


@dataclass(frozen=True)
class Call:
    """What a backend is chosen for: the ``device`` type, ``heads`` x ``head_dim`` (``None``: unknown), the
    grid's (or band's) ``image`` query tokens and ``text`` tokens, the window's ``radius`` (``None``: full
    attention) and ``down_factor``, and whether the call needs a backward (``with_grad``)."""

    device: str
    image: int = 0
    text: int = 0
    radius: float | None = None
    down_factor: int = 1
    heads: int | None = None
    head_dim: int | None = None
    with_grad: bool = False

    def describe(self) -> str:
        shape = f"{self.heads or '?'} heads x {self.head_dim or '?'}"
        side = round(self.image**0.5)
        grid = f"{side}x{side}" if side * side == self.image else f"{self.image}"
        window = "full attention" if self.radius is None else f"r={self.radius:g}, df={self.down_factor}"
        return (f"{self.device}, {shape}, {grid} image + {self.text} text tokens, {window}, "
                f"{'training' if self.with_grad else 'inference'}")


@dataclass(frozen=True)
class Backend:
    """One attention backend: its ``name`` (what ``backend=`` and ``--backend`` take), a ``summary``, its
    three functions (see the module docstring) and its constraints, each checked by :meth:`cannot_run`:

    ``devices``: device types (``"cuda"``, ``"cpu"``, ...) it runs on, ``None`` = every one;
    ``backward``: those where it also has a backward (``None`` = all of ``devices``);
    ``full_attention``: whether it plans ``radius=None`` (full attention) too, else such calls run
    :data:`REFERENCE`; ``pooled``: whether it plans the pooled keys of ``down_factor > 1``;
    ``backward_plans``: whether a call that needs a backward gets another grid plan (flex: with the
    query-block lists its backward reads); when False one cached plan serves both;
    ``auto``: device type (``"*"`` = any) -> fewest image tokens of a grid from which ``auto`` picks it
    where the device has no measurements (leave empty and ``auto`` never does)."""

    name: str
    summary: str
    grid_plan: Callable
    band_plan: Callable
    attend: Callable
    devices: tuple[str, ...] | None = None
    backward: tuple[str, ...] | None = None
    full_attention: bool = True
    pooled: bool = True
    backward_plans: bool = False
    auto: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def runs_on(self, device_type: str, with_grad: bool = False) -> bool:
        """Whether it runs a call on ``device_type`` (with a backward when ``with_grad``)."""
        return self.cannot_run(Call(device_type, radius=1, with_grad=with_grad)) is None

    def cannot_run(self, call: Call) -> str | None:
        """Why it cannot run ``call``, with the fix (``None``: it can). The checks, in order: device, backward,
        full attention, pooled keys."""
        if self.devices is not None and call.device not in self.devices:
            return (f"the {self.name!r} attention backend does not run on {call.device} (it runs on "
                    f"{', '.join(self.devices)}): use backend='auto' or {REFERENCE!r}")
        if call.with_grad and self.backward is not None and call.device not in self.backward:
            where = ", ".join(self.backward) if self.backward else "no device"
            return (f"the {self.name!r} attention backend has no backward on {call.device} (only on {where}): "
                    f"train with backend='auto' or {REFERENCE!r}, or run under torch.no_grad()")
        if call.radius is None and not self.full_attention:
            return f"{self.name!r} plans local windows only"
        if call.down_factor > 1 and not self.pooled:
            return f"the {self.name!r} attention backend has no pooled keys: use down_factor=1, or backend='auto'"
        return None

    def auto_threshold(self, device_type: str) -> int | None:
        return self.auto.get(device_type, self.auto.get("*"))

    def plan(self, layout, window, device, options: Options = Options(), with_grad: bool = False):
        """Its plan of a whole grid (a :class:`clear.geometry.TokenLayout`, whose pooled grid is checked here) or
        of a patch-parallel band (:class:`clear.geometry.BandLayout`)."""
        if hasattr(layout, "ext_rows"):  # a band
            plan = self.band_plan(layout, window, device, options)
        else:
            layout.pooled_grid(window)  # the grid divides into pooling cells: checked once, before any work
            plan = self.grid_plan(layout, window, device, options, with_grad)
        plan.backend = self.name
        return plan
