"""Attention backends: one file each, registered in one table that says where each can run.

A backend computes CLEAR attention from a *plan* built once per layout (outside compiled code):

* a whole grid (:class:`clear.geometry.TokenLayout`): queries are the call's tokens in natural
  order, keys are ``[natural order | pooled]`` (pooled tokens only when ``down_factor > 1``);
* a patch-parallel band (:class:`clear.geometry.BandLayout`): queries are the band's image
  tokens (row-major), keys are ``[text | band with its halo rows | pooled]``.

Every backend module (``clear/backends/<name>.py``) provides the same three functions, all on
``[B, S, heads, D]`` tensors:

* ``grid_plan(layout, window, device, options, with_grad) -> plan``
* ``band_plan(band, window, device, options) -> plan``
* ``attend(query, key, value, scale, *, return_lse=False, options=Options())``: unmasked
  attention (the text queries of patch parallelism);

and each plan has ``plan.attend(query, key, value, scale, return_lse=False)`` and the fields
``layout`` and ``backend`` (its registered name). With ``return_lse`` the call returns
``(out, lse)``: ``out [B, S, heads, D]`` and the log-sum-exp of the scaled logits
``lse [B, S, heads]``, both float32 (for merging partial softmaxes).

:data:`TABLE` order matters for ``auto`` only: :func:`resolve` picks the first backend whose
:attr:`Backend.auto` entry the call meets and that can run it, otherwise :data:`REFERENCE`.
Adding a backend = one file plus one line in the :func:`make_table` call of :data:`TABLE`.

This module imports nothing heavy (no torch): command lines take :func:`choices` for their
``--backend`` flag and still answer ``--help`` at once; a backend's module is imported when
it first plans or attends.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["Backend", "Options", "TABLE", "REFERENCE", "CPU_FLEX_MIN_TOKENS", "make_table", "names", "choices", "get",
           "resolve"]

# ``auto`` on CPU: image tokens from which compiled FlexAttention beats dense SDPA for inference
# (measured with scripts/benchmark.py attention --compile full, see docs/benchmarks.md).
CPU_FLEX_MIN_TOKENS = 64 * 64

# The backend every other one is tested against: runs on every device, with a backward, and
# plans full attention (radius None) too; ``auto``'s last resort.
REFERENCE = "dense"


@dataclass(frozen=True)
class Options:
    """What a :class:`clear.ClearAttention` hands every plan: ``tile`` (image tokens of one
    FlexAttention block, ``(rows, cols)``), ``kernel_options`` (of the compiled FlexAttention
    kernel) and ``compiled`` (run a compiled kernel even off CUDA). A backend ignores the ones
    it has no use for."""

    tile: tuple[int, int] = (8, 16)
    kernel_options: dict | None = field(default=None, compare=False, hash=False)
    compiled: bool = False


@dataclass(frozen=True)
class Backend:
    """One registered backend: its ``name``, the ``module`` implementing it (imported on first
    use), where it runs, and when ``auto`` picks it.

    ``devices``: device types (``"cuda"``, ``"cpu"``, ...) it runs on, ``None`` = every one;
    ``backward``: those where it also has a backward (``None`` = all of ``devices``);
    ``auto``: device type (``"*"`` = any) -> fewest image tokens of a grid from which ``auto``
    picks it (leave empty and ``auto`` never does); ``full_attention``: whether it plans
    ``radius=None`` (full attention) too, else such calls run :data:`REFERENCE`;
    ``backward_plans``: whether a call that needs a backward gets another grid plan (flex: with
    the query-block lists its backward reads); when False one cached plan serves both."""

    name: str
    module: str
    summary: str = ""
    devices: tuple[str, ...] | None = None
    backward: tuple[str, ...] | None = None
    auto: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    full_attention: bool = True
    backward_plans: bool = False

    def runs_on(self, device_type: str, with_grad: bool = False) -> bool:
        """Whether it runs a call on ``device_type`` (with a backward when ``with_grad``)."""
        ok = self.devices is None or device_type in self.devices
        if with_grad and self.backward is not None:
            ok = ok and device_type in self.backward
        return ok

    def check(self, device_type: str, with_grad: bool = False) -> None:
        """Raise a ValueError naming the fix when it cannot run such a call."""
        if self.devices is not None and device_type not in self.devices:
            raise ValueError(f"the {self.name!r} attention backend does not run on {device_type} (it runs on "
                             f"{', '.join(self.devices)}): use backend='auto' or {REFERENCE!r}")
        if not self.runs_on(device_type, with_grad):
            where = ", ".join(self.backward) if self.backward else "no device"
            raise ValueError(f"the {self.name!r} attention backend has no backward on {device_type} (only on {where}): "
                             f"train with backend='auto' or {REFERENCE!r}, or run under torch.no_grad()")

    def auto_threshold(self, device_type: str) -> int | None:
        return self.auto.get(device_type, self.auto.get("*"))

    @property
    def impl(self):
        """The implementing module (imported on first use)."""
        return importlib.import_module(self.module)

    def grid_plan(self, layout, window, device, options: Options = Options(), with_grad: bool = False):
        plan = self.impl.grid_plan(layout, window, device, options, with_grad)
        plan.backend = self.name
        return plan

    def band_plan(self, band, window, device, options: Options = Options()):
        plan = self.impl.band_plan(band, window, device, options)
        plan.backend = self.name
        return plan

    def attend(self, query, key, value, scale: float, *, return_lse: bool = False, options: Options = Options()):
        return self.impl.attend(query, key, value, scale, return_lse=return_lse, options=options)


def make_table(*backends: Backend) -> MappingProxyType:
    """A read-only table of ``backends`` by name, in ``auto``'s order of preference; names must be
    unique, not ``"auto"``, and the table must hold :data:`REFERENCE`."""
    names_ = [b.name for b in backends]
    bad = sorted({n for n in names_ if not n or n == "auto" or names_.count(n) > 1})
    if bad:
        raise ValueError(f"attention backend names must be unique and not 'auto': {', '.join(map(repr, bad))}")
    if REFERENCE not in names_:
        raise ValueError(f"the table of attention backends must hold the reference backend {REFERENCE!r}")
    return MappingProxyType({b.name: b for b in backends})


# The backends, in ``auto``'s order of preference: the one place that lists them.
TABLE: MappingProxyType = make_table(
    Backend(REFERENCE, "clear.backends.dense", "boolean mask + scaled_dot_product_attention; the oracle"),
    Backend("flex", "clear.backends.flex", "block-sparse FlexAttention over tile-ordered tokens, block masks "
            "from tile geometry; compiled on CUDA",
            devices=("cuda", "cpu", "xpu", "hpu", "mps"), backward=("cuda", "xpu", "hpu"),
            auto=MappingProxyType({"cuda": 0, "cpu": CPU_FLEX_MIN_TOKENS}), full_attention=False,
            backward_plans=True),
)


def names() -> tuple[str, ...]:
    """Registered backend names, sorted."""
    return tuple(sorted(TABLE))


def choices() -> tuple[str, ...]:
    """What a ``--backend`` flag accepts: ``"auto"`` and every registered name."""
    return ("auto", *names())


def get(name: str) -> Backend:
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {choices()}") from None


def resolve(name: str, device_type: str, num_image: int | None = None, with_grad: bool = False,
            windowed: bool = True) -> str:
    """The backend a call runs. A registered name stands for itself. ``auto``: the first
    backend of :data:`TABLE` that runs on ``device_type`` (with a backward when ``with_grad``),
    plans this window (``windowed`` False: full attention) and whose ``auto`` threshold for
    the device is at most ``num_image`` image tokens (``None`` counts as 0); else
    :data:`REFERENCE`. Today: flex on CUDA; on CPU flex for inference on grids of at least
    :data:`CPU_FLEX_MIN_TOKENS` image tokens, dense otherwise. Depends only on Python values,
    so it never breaks a compiled graph."""
    if name != "auto":
        return get(name).name
    tokens = num_image or 0
    for backend in TABLE.values():
        least = backend.auto_threshold(device_type)
        if (least is not None and tokens >= least and backend.runs_on(device_type, with_grad)
                and (windowed or backend.full_attention)):
            return backend.name
    return REFERENCE
