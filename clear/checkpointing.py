"""Training checkpoints on disk: which are complete, which run wrote them, and who may write.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>/``, written as ``checkpoint-<step>.tmp``
and renamed when complete. Its ``manifest.json``, written last, lists every file with its
size and SHA-256, so a checkpoint damaged or changed afterwards (a copy cut short, a file truncated
or edited, the manifest left behind) is recognised before anything of it is loaded: resuming from
``latest`` then falls back to the newest complete one (with finite CLEAR weights), and rotation
(``--checkpoints_total_limit``) counts and deletes complete checkpoints only, never the newest one.
The optimizer, schedule and random states (and DeepSpeed's ``*.pt`` files) are pickles, which
loading runs as code: the hashes find damage, not a forger who rewrites the manifest too, so a
checkpoint folder must come from someone you trust. ``run_settings.json`` holds the settings of the
run that wrote it; a resumed run compares its own with them (:func:`settings_changes`), and each
process's data state holds a fingerprint of the dataset (:func:`dataset_fingerprint`).

One run per output folder: :class:`OutputDirLock` holds ``<output_dir>/.lock`` (pid, host)
for the run's lifetime. :class:`CheckpointManager` puts these together for one run: which
checkpoint to resume from, restoring it, saving (finite weights only) and rotating; it drives
the ``accelerate.Accelerator`` it is given (nothing here imports accelerate).
``scripts/distill.py`` uses it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from .files import write_bytes
from .weights import clear_state_dict_keys, load_clear_weights, save_clear_weights

logger = logging.getLogger(__name__)

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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> None:
    """Record every file under ``folder`` with its size and SHA-256 (``{"files": {name: {"size", "sha256"}}}``);
    call it last, when the checkpoint is complete."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_bytes(folder / MANIFEST, json.dumps({"files": files}, indent=1).encode())


def checkpoint_problem(folder: str | os.PathLike, verify: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is: no manifest (a folder copied
    without it, or a save that never finished), a listed file missing or of another size, and with
    ``verify`` (before a resume loads it) one whose SHA-256 differs. Manifests of older versions,
    sizes only, are checked by size."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return (f"it has no {MANIFEST} (written last, when a checkpoint is complete): copy the whole folder, "
                "manifest included")
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = {name: entry if isinstance(entry, dict) else {"size": entry} for name, entry in files.items()}
        sizes = {name: int(entry["size"]) for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    if verify:
        for name, entry in entries.items():
            if "sha256" in entry and file_sha256(folder / name) != entry["sha256"]:
                return f"{name} is not the file that was written (its SHA-256 differs from the one in {MANIFEST})"
    return None


def latest_complete(output_dir: str | os.PathLike, problem=checkpoint_problem) -> tuple[Path | None,
                                                                                        list[tuple[Path, str]]]:
    """The newest complete checkpoint (None if there is none) and the newer, damaged ones with
    what is wrong with each; ``problem(folder)`` says what is wrong with one (:func:`checkpoint_problem`)."""
    damaged = []
    for folder in reversed(list_checkpoints(output_dir)):
        why = problem(folder)
        if why is None:
            return folder, damaged
        damaged.append((folder, why))
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
    complete = [d for d in list_checkpoints(output_dir) if checkpoint_problem(d, verify=False) is None]
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
        """Remove the lock if this process holds it. A lock that cannot be removed (the folder turned
        read-only) is left with a warning, not an error: its holder is gone once this process ends, so the
        next run on this host takes it over; an error here would bury the message the run ends with."""
        if self.held:
            self.held = False
            holder = self._holder() or {}
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError as e:
                    logger.warning("could not remove the lock %s (%s): the next run on this host takes it over, "
                                   "or delete it", self.path, e.strerror or e)

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


# what torch.save's C++ writer raises when a write fails (it does not keep the errno), and safetensors'
# SafetensorError (a Rust io::Error in its message: "IoError(Os { code: 28, kind: StorageFull, ... })")
_WRITE_FAILURES = ("iostream error", "failed writing", "No space left", "Disk quota", "IoError")
_FULL = ("No space left", "Disk quota", "StorageFull", "QuotaExceeded", "code: 28,", "code: 122,")
_NOT_WRITABLE = ("PermissionDenied", "ReadOnlyFilesystem", "code: 13,", "code: 30,")


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed write: an ``OSError``, or torch's / safetensors' own error for one."""
    return isinstance(err, OSError) or (isinstance(err, (RuntimeError, SafetensorError))
                                        and any(s in str(err) for s in _WRITE_FAILURES))


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
    code = err.errno if isinstance(err, OSError) else None
    full = code in (errno.ENOSPC, errno.EDQUOT) or (code is None and any(s in str(err) for s in _FULL))
    denied = code in (errno.EACCES, errno.EPERM, errno.EROFS) or (code is None and any(s in str(err)
                                                                                    for s in _NOT_WRITABLE))
    detail = " ".join(str(err).split())  # one line
    if isinstance(err, OSError) and err.strerror:
        detail = err.strerror + (f": {err.filename}" if err.filename else "")
    if denied:
        return (f"could not write the checkpoint {path}: {path.parent} is not writable ({detail}); {free}. The "
                f"earlier checkpoints are intact: fix the permissions of {path.parent} (or copy the run to another "
                "--output_dir), then resume with --resume_from_checkpoint latest")
    cause = "the disk is full" if full else "a write failed"
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


# ------------------------------------------------------------------------------------------
# one run's checkpoints: choose, restore, save
# ------------------------------------------------------------------------------------------

class CheckpointManager:
    """The checkpoints of one training run in ``output_dir``.

    * :meth:`choose_resume`: the checkpoint to continue from (``--resume_from_checkpoint``: a
      folder or ``latest``, the newest complete one, damaged newer ones set aside), refused
      unless written with this run's ``settings`` (changes outside ``harmless`` need
      ``allow_changed``) and dataset ``fingerprint``; returns it with this process's data state.
    * :meth:`track`: checkpoints hold ``model``'s CLEAR weights (the released layout,
      ``weights_name``), not a copy of the whole frozen model.
    * :meth:`restore`: load the chosen checkpoint into the prepared model, optimizer and schedule.
    * :meth:`check_step` / :meth:`check_weights`: stop on a non-finite loss, gradient or weight,
      naming the last checkpoint.
    * :meth:`save`: finite weights only, complete (manifest written) before the folder gets its
      name, then older ones rotate out (``keep``); :meth:`export` writes the final weights.

    ``accelerator``: the run's ``accelerate.Accelerator`` (``save_state``/``load_state``,
    barriers, the process index); ``deepspeed``: whether it runs DeepSpeed (which restores the
    module itself and saves without the frozen weights). ``log``: where decisions are logged."""

    def __init__(self, output_dir: str | os.PathLike, accelerator, settings: dict, fingerprint: dict,
                 weights_name: str, keep: int | None = None, harmless: frozenset = frozenset(),
                 allow_changed: bool = False, deepspeed: bool = False, log: logging.Logger | None = None):
        self.output_dir, self.accelerator = Path(output_dir), accelerator
        self.settings, self.fingerprint, self.weights_name = settings, fingerprint, weights_name
        self.keep, self.harmless, self.allow_changed, self.deepspeed = keep, harmless, allow_changed, deepspeed
        self.log = log or logger
        self.is_main = accelerator.is_main_process
        self.model = None
        self.last_saved: Path | None = None  # what a non-finite step's message points to

    # -- which checkpoint to resume from ----------------------------------------------------

    def choose_resume(self, resume_from: str | None, data_root: str = "") -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from (None: a new run) and this process's data state in it, once
        the checkpoint is complete and was written with this run's settings and dataset. Raises
        :class:`CheckpointError` saying what to do otherwise."""
        output_dir, accelerator = self.output_dir, self.accelerator
        existing = list_checkpoints(output_dir)
        if existing and not resume_from:
            raise CheckpointError(f"{output_dir} already holds {', '.join(d.name for d in existing)}: pass "
                                  "--resume_from_checkpoint latest to continue that run, or choose another "
                                  "--output_dir")
        resume, damaged = None, []
        if resume_from == "latest":
            resume, damaged = latest_complete(output_dir, self.problem)
            if resume is None and damaged:
                raise CheckpointError(f"no complete checkpoint in {output_dir}: "
                                      + "; ".join(f"{d.name}: {why}" for d, why in damaged)
                                      + ". Move them away to start a new run, or choose another --output_dir")
            if resume is None:
                self.log.info("no checkpoint in %s: starting a new run", output_dir)
        elif resume_from:
            resume = Path(resume_from)
            if not resume.is_dir() or checkpoint_step(resume) is None:
                raise CheckpointError(f"--resume_from_checkpoint {resume} is not a checkpoint folder "
                                      "(checkpoint-<step>)")
            problem = self.problem(resume)
            if problem:
                raise CheckpointError(f"--resume_from_checkpoint {resume} cannot be used: {problem}. Resume from an "
                                      "earlier checkpoint (a checkpoint holds pickles, which loading runs as code: "
                                      "use only folders you trust)")
            later = [d.name for d in existing if checkpoint_step(d) > checkpoint_step(resume)]
            if resume.parent.resolve() == output_dir.resolve() and later:
                raise CheckpointError(f"resuming from {resume.name} would overwrite the later {', '.join(later)}: "
                                      "move them away first, or resume from 'latest'")
        accelerator.wait_for_everyone()  # every process has chosen before damaged checkpoints move
        for folder, problem in damaged:
            if self.is_main:
                aside = set_aside(folder)
                self.log.warning("%s is damaged (%s): resuming from %s instead; the damaged one is kept as %s",
                                 folder.name, problem, resume.name, aside.name)
        accelerator.wait_for_everyone()
        if resume is None:
            return None, None
        self._check_settings(resume)
        return resume, self._data_state(resume, data_root)

    def problem(self, folder: Path) -> str | None:
        """Why ``folder`` cannot be resumed from, or None: :func:`checkpoint_problem` (every file's size and
        SHA-256 against the manifest), then its CLEAR weights must be finite. Nothing is unpickled."""
        problem = checkpoint_problem(folder)
        weights = Path(folder) / self.weights_name
        if problem is None and weights.is_file():
            bad = nonfinite_tensors(load_file(str(weights)))
            if bad:
                problem = f"its CLEAR weights {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are not finite"
        return problem

    def _check_settings(self, resume: Path) -> None:
        saved = load_settings(resume)
        if saved is None:
            self.log.warning("%s records no run settings (written by an older version): the settings of this run "
                             "cannot be compared with it", resume)
            return
        refused, allowed = settings_changes(saved, self.settings, self.harmless)
        if refused and not self.allow_changed:
            raise CheckpointError(f"{resume} was written with other settings, and these change the optimisation or "
                                  "the data order:\n  " + "\n  ".join(refused) + "\nresume with the checkpoint's "
                                  "values, or pass --allow_changed_settings to continue with the new ones")
        if refused:
            self.log.warning("--allow_changed_settings: resuming %s with changed settings:\n  %s", resume,
                             "\n  ".join(refused))
        if allowed:
            self.log.info("resuming %s; changed settings that do not alter the training: %s", resume,
                          "; ".join(allowed))

    def _data_state(self, resume: Path, data_root: str) -> dict:
        state_file = resume / f"data_state.rank{self.accelerator.process_index}.json"
        if not state_file.is_file():
            raise CheckpointError(f"{resume} has no {state_file.name}: it was written by another number of processes; "
                                  "resume with the same number of processes as the run that wrote it")
        data_state = json.loads(state_file.read_text())
        change = dataset_change(data_state.get("dataset"), self.fingerprint)
        if change and not self.allow_changed:
            raise CheckpointError(f"the dataset in {data_root} changed since {resume.name} was written: {change}. The "
                                  "saved data position refers to the old data: restore it, or start a new run in "
                                  "another --output_dir (--allow_changed_settings continues at the same position in "
                                  "the new data)")
        if change:
            self.log.warning("--allow_changed_settings: the dataset changed since %s (%s); continuing at the same "
                             "position in the new data", resume.name, change)
        return data_state

    # -- the model's part of a checkpoint, restoring one --------------------------------------

    def track(self, model) -> None:
        """Checkpoints hold ``model``'s CLEAR weights (the unwrapped student), not the whole model."""
        self.model = model

        def save_model_hook(models, weights, _dir):
            weights.clear()

        def load_model_hook(models, input_dir):
            if models:  # (DeepSpeed restores the module itself)
                models.clear()
                load_clear_weights(model, Path(input_dir) / self.weights_name)

        self.accelerator.register_save_state_pre_hook(save_model_hook)
        self.accelerator.register_load_state_pre_hook(load_model_hook)

    def restore(self, resume: Path, lr_scheduler, learning_rate: float, hyperparameters: dict) -> int:
        """Load ``resume`` (model, optimizer, schedule, random states), then train on with this run's
        learning rate, schedule and optimizer ``hyperparameters`` (:func:`use_run_hyperparameters`).
        Returns the step to continue from."""
        self.log.info("resuming from %s", resume)
        self.accelerator.load_state(str(resume), **({"load_module_strict": False} if self.deepspeed else {}))
        use_run_hyperparameters(lr_scheduler, learning_rate, hyperparameters)
        self.last_saved = resume
        return checkpoint_step(resume)

    # -- non-finite values ------------------------------------------------------------------

    def check_step(self, step: int, values: dict) -> None:
        """:func:`check_step_finite`, naming the last checkpoint written or resumed from."""
        check_step_finite(step, values, self.last_saved)

    def check_weights(self, step: int) -> None:
        bad = nonfinite_tensors(clear_state_dict_keys(self.model))
        if bad:
            raise NonFiniteError(f"step {step}: the CLEAR weights {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                 "are not finite; nothing was saved. Lower --learning_rate and resume from the last "
                                 "checkpoint")

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, data_state: dict) -> Path:
        """``checkpoint-<step>``: the accelerate state, the CLEAR weights, the run's settings and
        each process's ``data_state`` (with the dataset's fingerprint). Only finite weights are
        saved; the checkpoint is complete (manifest written) before it gets its name, and only
        then do older ones rotate out. A failed write raises :class:`CheckpointError` with the
        free space; the earlier checkpoints stay."""
        self.check_weights(step)
        accelerator, is_main = self.accelerator, self.is_main
        final, tmp = self.output_dir / f"checkpoint-{step}", self.output_dir / f"checkpoint-{step}.tmp"
        if is_main and tmp.exists():
            shutil.rmtree(tmp)  # an unfinished save of a killed run (this run holds the folder's lock)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if self.deepspeed else {}))
            write_bytes(tmp / f"data_state.rank{accelerator.process_index}.json",
                        json.dumps({**data_state, "dataset": self.fingerprint}).encode())
            if is_main:
                save_clear_weights(self.model, tmp / self.weights_name)
                save_settings(tmp, self.settings)
            accelerator.wait_for_everyone()
            if is_main:
                write_manifest(tmp)
        except Exception as e:
            if is_main:  # nothing half-written stays, whatever the error
                shutil.rmtree(tmp, ignore_errors=True)
            if not is_write_failure(e):
                raise
            raise CheckpointError(write_failure_message(final, e)) from e
        if is_main:
            tmp.rename(final)
            if self.keep:
                rotate(self.output_dir, self.keep)
            self.log.info("saved %s", final)
        accelerator.wait_for_everyone()
        self.last_saved = final
        return final

    def export(self, step: int) -> Path:
        """The final CLEAR weights, ``<output_dir>/<weights_name>`` (finite ones only; main process)."""
        weights = self.output_dir / self.weights_name
        self.check_weights(step)
        if self.is_main:
            try:
                save_clear_weights(self.model, weights)
            except Exception as e:
                if not is_write_failure(e):
                    raise
                raise CheckpointError(write_failure_message(weights, e).replace("the checkpoint", "the weights")) from e
            self.log.info("CLEAR weights: %s", weights)
        return weights
