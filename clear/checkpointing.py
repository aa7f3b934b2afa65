"""Training checkpoints on disk: which are complete, which run wrote them, and who may write.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>/``, written as ``checkpoint-<step>.tmp``
and renamed when complete. Its ``manifest.json``, written last, lists every file with its
size, so a checkpoint damaged afterwards (a copy cut short, a file truncated) is recognised:
resuming from ``latest`` then falls back to the newest complete one, and rotation
(``--checkpoints_total_limit``) counts and deletes complete checkpoints only, never the
newest one. ``run_settings.json`` holds the settings of the run that wrote it; a resumed run
compares its own with them (:func:`settings_changes`), and each process's data state holds
a fingerprint of the dataset (:func:`dataset_fingerprint`).

One run per output folder: :class:`OutputDirLock` holds ``<output_dir>/.lock`` (pid, host)
for the run's lifetime. Nothing here knows about accelerate; ``scripts/distill.py`` calls it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .files import write_bytes

MANIFEST = "manifest.json"
SETTINGS = "run_settings.json"
LOCK = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint or output folder that cannot be used; the message says what to do."""


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss, gradient or weight; the message names the step and the values."""


# ------------------------------------------------------------------------------------------
# which checkpoints exist and are complete
# ------------------------------------------------------------------------------------------

def checkpoint_step(path: str | os.PathLike) -> int | None:
    """``checkpoint-1200`` -> 1200; None for any other name (``checkpoint-1200.tmp`` etc.)."""
    prefix, _, step = Path(path).name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders (``checkpoint-<step>``; unfinished ``.tmp`` ones excluded), oldest first."""
    found = [d for d in Path(output_dir).glob("checkpoint-*") if d.is_dir() and checkpoint_step(d) is not None]
    return sorted(found, key=checkpoint_step)


def write_manifest(folder: str | os.PathLike) -> None:
    """Record every file under ``folder`` with its size; call it last, when the checkpoint is complete."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_bytes(folder / MANIFEST, json.dumps({"files": files}, indent=1).encode())


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is. A checkpoint without a
    manifest (written before manifests existed) cannot be checked and counts as complete."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def latest_complete(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint (None if there is none) and the newer, damaged ones with
    what is wrong with each."""
    damaged = []
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    return None, damaged


def set_aside(folder: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged`` (``.damaged-1``, ... if taken), out of
    the way of the run that will write that step again, but kept for inspection."""
    folder = Path(folder)
    target, n = folder.with_name(folder.name + ".damaged"), 0
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged-{n}")
    folder.rename(target)
    return target


def rotate(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints so that ``keep`` (>= 1) complete ones remain;
    damaged ones neither count nor get deleted, so the newest complete checkpoint always
    stays. Returns the deleted folders."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, not {keep}")
    complete = [d for d in list_checkpoints(output_dir) if checkpoint_problem(d) is None]
    old = complete[: max(0, len(complete) - keep)]
    for folder in old:
        shutil.rmtree(folder)
    return old


# ------------------------------------------------------------------------------------------
# non-finite values
# ------------------------------------------------------------------------------------------

def _finite(value) -> bool:
    if value is None:
        return True
    if hasattr(value, "isfinite"):  # a tensor
        return bool(value.isfinite().all())
    return math.isfinite(float(value))


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the tensors in ``{name: tensor}`` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if not _finite(t.detach())]


def check_step_finite(step: int, values: dict, last_checkpoint: str | os.PathLike | None = None) -> None:
    """Raise :class:`NonFiniteError` when one of ``values`` (``{"loss": ..., "gradient norm": ...}``;
    floats, tensors or None) is NaN or infinite at optimizer step ``step``."""
    bad = {k: v for k, v in values.items() if not _finite(v)}
    if not bad:
        return
    shown = ", ".join(f"{k} {float(v) if not hasattr(v, 'numel') or v.numel() == 1 else 'non-finite'}"
                      for k, v in bad.items())
    kept = (f"the last checkpoint, {Path(last_checkpoint).name}, holds finite weights"
            if last_checkpoint else "no checkpoint was written")
    raise NonFiniteError(
        f"training diverged at step {step}: {shown}. Stopped before saving anything of this step; {kept}. "
        "Lower --learning_rate (or --max_grad_norm), then resume with --resume_from_checkpoint latest "
        "--allow_changed_settings, or start again in a new --output_dir")


# ------------------------------------------------------------------------------------------
# the output folder: writable, locked, disk full
# ------------------------------------------------------------------------------------------

def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write a file in it; raise :class:`CheckpointError` if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointError(f"--output_dir {folder} is not a writable folder ({e.strerror or e}): checkpoints "
                              "could not be saved there; fix its permissions or choose another --output_dir") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class OutputDirLock:
    """``<folder>/.lock`` held by one run: ``acquire()`` creates it (exclusively) with this
    process's pid and host, or raises :class:`CheckpointError` naming the holder. A lock left
    by a dead process on this host is taken over (``acquire`` returns a warning saying so); a
    lock from another host is never assumed stale. Use as a context manager."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage

    def acquire(self) -> str | None:
        warning = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == self.me["host"] and not _pid_alive(pid):
                    try:  # rename, so that of two runs taking over the same stale lock only one succeeds
                        self.path.rename(self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
                        self.path.with_name(f"{LOCK}.stale-{os.getpid()}").unlink()
                    except FileNotFoundError:
                        pass
                    warning = (f"took over {self.path}: its holder, pid {pid} on {host}, is no longer running "
                               "(a killed run)")
                    continue
                who = f"pid {pid} on {host}" if pid is not None else "a run that is still writing the lock"
                since = holder.get("since")
                raise CheckpointError(
                    f"{self.path.parent} is in use by another run ({who}"
                    + (f", since {since}" if since else "") + "): two runs on one --output_dir would overwrite "
                    f"each other's checkpoints. Wait for it to finish or choose another --output_dir; if that "
                    f"process is gone (e.g. another machine's run that was killed), delete {self.path}")
            with os.fdopen(fd, "w") as f:
                json.dump({**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return warning
        raise CheckpointError(f"could not take the lock {self.path}: other runs keep creating it; start one at a time")

    def release(self) -> None:
        if self.held:
            holder = self._holder() or {}
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# what torch.save's C++ writer raises when a write fails (it does not keep the errno)
_WRITE_FAILURES = ("iostream error", "failed writing", "No space left", "Disk quota")


def is_write_failure(err: BaseException) -> bool:
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and any(s in str(err) for s in _WRITE_FAILURES))


def write_failure_message(path: str | os.PathLike, err: BaseException) -> str:
    """One line for a failed checkpoint write: the path, the error, and the free space there."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{_human(shutil.disk_usage(probe).free)} free on that disk"
    except OSError:
        free = "free space unknown"
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = "the disk is full" if full else "a write failed"
    detail = str(err)
    if isinstance(err, OSError) and err.strerror:
        detail = err.strerror + (f": {err.filename}" if err.filename else "")
    return (f"could not write the checkpoint {path}: {cause} ({detail}); {free}. The earlier checkpoints are "
            "intact: free some space (or lower --checkpoints_total_limit, or use an --output_dir on a larger "
            "disk), then resume with --resume_from_checkpoint latest")


# ------------------------------------------------------------------------------------------
# honest resume: the same settings, the same data
# ------------------------------------------------------------------------------------------

def dataset_fingerprint(sample_ids: list[str]) -> dict:
    """``{"num_samples": n, "sha256": ...}`` of the sorted sample ids: the data a position refers to."""
    digest = hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()
    return {"num_samples": len(sample_ids), "sha256": digest}


def dataset_change(saved: dict | None, current: dict) -> str | None:
    """What differs between a checkpoint's dataset fingerprint and this run's, or None."""
    if saved is None or saved == current:
        return None
    if saved.get("num_samples") != current["num_samples"]:
        return f"it had {saved.get('num_samples')} samples, now {current['num_samples']}"
    return f"it had other samples (the same count, {current['num_samples']}, but other ids)"


def settings_changes(saved: dict, current: dict, harmless: set | frozenset = frozenset()) -> tuple[list, list]:
    """Compare two ``{setting: value}`` dicts (JSON values). Returns ``(refused, allowed)``:
    lines ``"name: was X, now Y"`` for changed settings outside ``harmless`` and inside it."""
    refused, allowed = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "(not set)"), current.get(key, "(not set)")
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            (allowed if key in harmless else refused).append(f"{key}: was {old!r}, now {new!r}")
    return refused, allowed


def use_run_hyperparameters(scheduler, learning_rate: float, hyperparameters: dict | None = None) -> list[float]:
    """After a resume, train with this run's learning rate, schedule and optimizer settings.

    Restoring a checkpoint brings back the learning-rate scheduler's base learning rate and the
    optimizer's parameter-group settings (``lr``, ``betas``, ``weight_decay``, ...) of the run
    that wrote it; the schedule's shape (warm-up, decay, length) is the newly built
    scheduler's, with its restored position. This sets the base learning rate to
    ``learning_rate``, each parameter group's ``hyperparameters`` (``{"betas": ..., ...}``) to
    this run's, and the current learning rate to ``base * schedule(position)``, as the
    scheduler itself would have. Nothing changes when the run's settings are the checkpoint's.
    ``scheduler``: a ``torch.optim.lr_scheduler.LambdaLR`` (every diffusers schedule is one),
    bare or wrapped by accelerate. Returns the current learning rates."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
    if not hasattr(scheduler, "lr_lambdas"):
        raise TypeError(f"cannot apply a new learning rate to a restored {type(scheduler).__name__}: only LambdaLR "
                        "schedules (those of diffusers.optimization.get_scheduler) are supported")
    lrs = [float(learning_rate) * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]  # as LambdaLR.get_lr
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group.update(hyperparameters or {})
        group["initial_lr"], group["lr"] = float(learning_rate), lr
    scheduler.load_state_dict({**scheduler.state_dict(), "base_lrs": [float(learning_rate)] * len(lrs),
                               "_last_lr": list(lrs)})  # _last_lr: what get_last_lr() reports
    return lrs


def save_settings(folder: str | os.PathLike, settings: dict) -> None:
    write_bytes(Path(folder) / SETTINGS, json.dumps(settings, indent=1, sort_keys=True).encode())


def load_settings(folder: str | os.PathLike) -> dict | None:
    """The settings stored in a checkpoint, or None for a checkpoint written before they were."""
    path = Path(folder) / SETTINGS
    return json.loads(path.read_text()) if path.is_file() else None
