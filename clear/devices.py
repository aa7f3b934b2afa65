"""The one device and dtype resolver: every library function and command line picks its device
and dtype here.

* device: ``None`` or ``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other
  name is checked against this machine (:func:`check_device`).
* dtype: the names in :data:`DTYPES` (``bf16``/``bfloat16``, ``fp16``/``float16``,
  ``fp32``/``float32``, and ``half``/``float``) or a ``torch.dtype``; ``None`` or ``"auto"`` ->
  bfloat16 on CUDA, float32 elsewhere.

Command lines take ``choices=DTYPE_CHOICES``. This module imports torch only when a function
runs, so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "DTYPE_CHOICES", "check_device", "default_device", "resolve_device", "resolve_dtype",
           "rank_device"]

# accepted name -> torch attribute
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
          "float32": "float32", "fp32": "float32", "float": "float32"}
DTYPE_CHOICES = ("auto", *DTYPES)  # for argparse: "auto" = bfloat16 on CUDA, float32 elsewhere


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it: ``cuda`` needs a CUDA build of torch and a visible GPU
    (``cuda:N``: at least N+1 of them), ``mps`` Apple's backend."""
    import torch  # here: command lines import this module before parsing; --help stays torch-free

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a device name ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"{built}; no GPU visible). Use --device cpu, or install a CUDA build of torch on a "
                             "machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0; choose cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: Apple's MPS backend is not available here; use --device cpu")
    return dev


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch  # here: command lines import this module before parsing; --help stays torch-free

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: :func:`default_device`; anything else checked by :func:`check_device`."""
    import torch  # here: command lines import this module before parsing; --help stays torch-free

    if device is None or str(device) == "auto":
        return torch.device(default_device())
    return check_device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A ``torch.dtype``, a name of :data:`DTYPES`, or ``None``/``"auto"`` (bfloat16 on CUDA, float32 elsewhere)."""
    import torch  # here: command lines import this module before parsing; --help stays torch-free

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype) == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return getattr(torch, DTYPES[str(dtype)])


def rank_device(local_rank: int, dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """A torchrun process's device (``cuda:LOCAL_RANK`` when CUDA is there, else the CPU) and
    its dtype (:func:`resolve_dtype`)."""
    import torch  # here: command lines import this module before parsing; --help stays torch-free

    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return device, resolve_dtype(dtype, device)
