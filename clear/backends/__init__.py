"""Attention backends: one file each, registered with their constraints next to their code, chosen in one place.

Every backend module (``dense.py``, ``flex.py``, ``tiled.py``) ends with its registration,
``BACKEND = Backend(name, summary, grid_plan, band_plan, attend, devices=..., backward=...,
full_attention=..., pooled=...)`` (:class:`clear.backends.base.Backend`: the functions, the plan interface
and each constraint). This module imports them and lists them in :data:`TABLE`, in ``auto``'s order of
preference: the one place that lists them.

:func:`decide` is the one rule that says which backend a call (:class:`Call`) runs and why, ``auto``
included: a named backend after its ordered checks (:meth:`Backend.cannot_run`: device, backward, full
attention, pooled keys; full attention on a backend that plans windows only runs :data:`REFERENCE`, the
one fall-back); ``auto`` from shipped measurements where the device has them (``measured/<device>.json``,
written by ``scripts/benchmark.py auto``), else from the table's :attr:`Backend.auto` entries in
:data:`TABLE` order, else :data:`REFERENCE`. :meth:`clear.ClearAttention.plan` asks it once per plan and
builds the plan with :meth:`Backend.plan`.

Adding a backend = one file ending with its ``BACKEND`` plus its entry in the :func:`make_table` call of
:data:`TABLE` (and, for ``auto`` to pick it on a device with measurements, a new measurement run). Command
lines take their ``--backend`` choices from :data:`clear.defaults.BACKEND_CHOICES` (no torch for
``--help``), which tests hold equal to :func:`choices`.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from types import MappingProxyType

from . import dense, flex, tiled
from .base import REFERENCE, Backend, Call, Options

__all__ = ["Backend", "Call", "Options", "TABLE", "REFERENCE", "MEASURED_DIR", "make_table", "names", "choices",
           "get", "decide", "resolve", "measurements"]

# Measurements ``auto`` reads, one JSON file per device type (scripts/benchmark.py auto writes them).
MEASURED_DIR = Path(__file__).with_name("measured")


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
TABLE: MappingProxyType = make_table(dense.BACKEND, flex.BACKEND, tiled.BACKEND)


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
# Which backend runs a call
# ------------------------------------------------------------------------------------------


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
    ok = {n: t for n, t in rec["seconds"].items()
          if n in TABLE and t is not None and TABLE[n].cannot_run(call) is None}
    return min(ok, key=ok.get) if ok else None


def decide(name: str, call: Call) -> tuple[str, str]:
    """The backend a call runs, and why. The one rule every plan goes through:

    * a registered name stands for itself once its checks pass (:meth:`Backend.cannot_run`; a ValueError
      naming the fix where one fails), except that full attention (``radius=None``) on a backend that plans
      windows only runs :data:`REFERENCE` (the one fall-back);
    * ``auto``: where this device has shipped measurements (:func:`measurements`), the fastest backend of
      the measured call nearest to this one (same backward and down-factor class; nearest in tokens, head
      size and radius, on a log scale); elsewhere the first backend of :data:`TABLE` whose ``auto`` entry
      for the device the call meets and that can run it; else :data:`REFERENCE`.

    Depends only on Python values, so it never breaks a compiled graph."""
    if name != "auto":
        backend = get(name)
        if call.radius is None and not backend.full_attention:
            return REFERENCE, f"{name!r} plans local windows only: full attention runs {REFERENCE!r}"
        why_not = backend.cannot_run(call)
        if why_not is not None:
            raise ValueError(why_not)
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
        if least is not None and call.image >= least and backend.cannot_run(call) is None:
            return backend.name, f"the table's rule for {call.device} (from {least} image tokens)"
    return REFERENCE, "the reference backend (no faster one applies)"


def resolve(name: str, device_type: str, num_image: int | None = None, with_grad: bool = False,
            windowed: bool = True) -> str:
    """:func:`decide`'s backend for a call given by its device type, image tokens, backward and whether it is
    windowed (a radius of 4, no head size: shorthand for tests and callers without a :class:`Call`)."""
    return decide(name, Call(device_type, num_image or 0, radius=4 if windowed else None, with_grad=with_grad))[0]
