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

:func:`decide` is the one rule that says which backend a call runs (``auto`` included) and why: from
shipped measurements where the device has them (``measured/<device>.json``, written by
``scripts/benchmark.py auto``), else from the table's :attr:`Backend.auto` entries in :data:`TABLE`
order, else :data:`REFERENCE`. :func:`build_plan` is the one place a plan is built.
Adding a backend = one file plus one line in the :func:`make_table` call of :data:`TABLE`
(and, for ``auto`` to pick it on a device with measurements, a new measurement run).

This module imports nothing heavy (no torch): command lines take :func:`choices` for their
``--backend`` flag and still answer ``--help`` at once; a backend's module is imported when
it first plans or attends.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

__all__ = ["Backend", "Call", "Options", "TABLE", "REFERENCE", "MEASURED_DIR", "make_table", "names", "choices",
           "get", "decide", "resolve", "measurements", "build_plan"]

# Measurements ``auto`` reads, one JSON file per device type (scripts/benchmark.py auto writes them).
MEASURED_DIR = Path(__file__).with_name("measured")

# The backend every other one is tested against: runs on every device, with a backward, and
# plans full attention (radius None) too; ``auto``'s last resort.
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
            auto=MappingProxyType({"cuda": 0}), full_attention=False,
            backward_plans=True),
    Backend("tiled", "clear.backends.tiled", "query tiles with their gathered key windows in one batched "
            "scaled_dot_product_attention; a backward everywhere", full_attention=False),
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


# ------------------------------------------------------------------------------------------
# What a call is, and which backend runs it
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """What ``auto`` decides on: the ``device`` type, ``heads`` x ``head_dim`` (``None``: unknown), the grid's
    ``image`` tokens and ``text`` tokens, the window's ``radius`` (``None``: full attention) and
    ``down_factor``, and whether the call needs a backward (``with_grad``)."""

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


@functools.cache
def measurements(device: str) -> tuple[dict, ...]:
    """The shipped measurements ``auto`` reads for ``device`` (``clear/backends/measured/<device>.json``,
    written by ``scripts/benchmark.py auto``): one record per measured call, each with its seconds per
    backend. Empty where nothing was measured."""
    path = MEASURED_DIR / f"{device}.json"
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["records"])


def _distance(call: Call, rec: dict) -> float:
    """How far a measured record is from ``call`` (log-scale in tokens, head size, radius; the down factor and
    the backward must match)."""
    if rec["with_grad"] != call.with_grad or (rec["down_factor"] > 1) != (call.down_factor > 1):
        return math.inf
    if (rec["radius"] is None) != (call.radius is None):
        return math.inf

    def log_gap(a, b):
        return abs(math.log(max(a, 1) / max(b, 1)))

    d = 2 * log_gap(call.image, rec["image"]) + log_gap(call.text + 1, rec["text"] + 1)
    if call.radius is not None:
        d += log_gap(call.radius, rec["radius"])
    if call.head_dim:
        d += log_gap(call.head_dim, rec["head_dim"])
    if call.heads:
        d += 0.5 * log_gap(call.heads, rec["heads"])
    return d


def _fastest(call: Call, rec: dict) -> str | None:
    """The fastest backend of a record among those that can run ``call``."""
    ok = {n: t for n, t in rec["seconds"].items() if n in TABLE and t is not None
          and TABLE[n].runs_on(call.device, call.with_grad) and (call.radius is not None or TABLE[n].full_attention)}
    return min(ok, key=ok.get) if ok else None


def decide(name: str, call: Call) -> tuple[str, str]:
    """The backend a call runs, and why. The one rule every caller goes through:

    * a registered name stands for itself, except that full attention (``radius=None``) on a backend that
      plans windows only runs :data:`REFERENCE` (the one fall-back);
    * ``auto``: where this device has shipped measurements (:func:`measurements`), the fastest backend of
      the measured call nearest to this one (same backward and down-factor class; nearest in tokens, head
      size and radius, on a log scale); elsewhere the first backend of :data:`TABLE` whose ``auto`` entry
      for the device the call meets and that can run it; else :data:`REFERENCE`.

    Depends only on Python values, so it never breaks a compiled graph."""
    if name != "auto":
        backend = get(name)
        if call.radius is None and not backend.full_attention:
            return REFERENCE, f"{name!r} plans local windows only: full attention runs {REFERENCE!r}"
        return backend.name, "as asked"
    records = measurements(call.device)
    if records:
        nearest = min(records, key=lambda rec: _distance(call, rec))
        if _distance(call, nearest) < math.inf:
            best = _fastest(call, nearest)
            if best is not None:
                times = ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in sorted(nearest["seconds"].items())
                                  if t is not None)
                return best, (f"fastest in the measurement nearest to this call ({nearest['heads']} heads x "
                              f"{nearest['head_dim']}, {nearest['image']} image tokens, r={nearest['radius']}, "
                              f"df={nearest['down_factor']}: {times})")
    for backend in TABLE.values():
        least = backend.auto_threshold(call.device)
        if (least is not None and call.image >= least and backend.runs_on(call.device, call.with_grad)
                and (call.radius is not None or backend.full_attention)):
            return backend.name, f"the table's rule for {call.device} (from {least} image tokens)"
    return REFERENCE, "the reference backend (no faster one applies)"


def resolve(name: str, device_type: str, num_image: int | None = None, with_grad: bool = False,
            windowed: bool = True) -> str:
    """:func:`decide`'s backend for a call given by its device type, image tokens, backward and whether it is
    windowed (a radius of 4, no head size: shorthand for tests and callers without a :class:`Call`)."""
    return decide(name, Call(device_type, num_image or 0, radius=4 if windowed else None, with_grad=with_grad))[0]


def build_plan(name: str, layout, window, device, options: Options = Options(), with_grad: bool = False):
    """The one place a plan is built: ``name``'s (a resolved backend) plan of a whole grid (a
    :class:`clear.geometry.TokenLayout`) or a patch-parallel band (:class:`clear.geometry.BandLayout`), after
    checking that the backend can run it."""
    backend = get(name)
    backend.check(device.type, with_grad)
    if hasattr(layout, "ext_rows"):  # a band
        return backend.band_plan(layout, window, device, options)
    layout.pooled_grid(window)  # validates divisibility before any work
    return backend.grid_plan(layout, window, device, options, with_grad)
