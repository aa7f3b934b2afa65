"""Training samples on disk: webdataset tar shards or a folder of loose files, read in place.

A sample is a group of files sharing a key (the webdataset convention: the key is the
file name up to its first dot, so ``000123.jpg`` and ``000123.json`` are one sample with
the extensions ``jpg`` and ``json``). Tars are indexed, never unpacked: a member is read
by seeking to its offset, so a downloaded shard such as text-to-image-2M's
``data_1024_10K/data_000000.tar`` is used as is.

Every sample has an id unique under the data root: ``<tar path without .tar>/<key>`` for
a tar member, ``<relative path of the key>`` for loose files. Feature caches mirror ids
(``<cache_dir>/<kind>/<id>.safetensors``), so caches stay valid when shards are added.

Writes are atomic (a temporary file in the same folder, renamed into place): a killed job
leaves either the old state or the new file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module needs no torch at import time
    import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LOOSE_EXTS = IMAGE_EXTS + ("json", "txt")  # loose files that make up samples (tars: every member)


@dataclass(frozen=True)
class Member:
    """Where one file of a sample lives: a loose file (``offset is None``) or a tar member."""

    path: str
    offset: int | None = None
    size: int | None = None

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Sample:
    """One training sample: its id and its files by extension (``{"jpg": Member, "json": Member}``)."""

    id: str
    files: dict

    @property
    def key(self) -> str:
        return self.id.rsplit("/", 1)[-1]

    def read(self, ext: str) -> bytes:
        return self.files[ext].read()


def split_key(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg"`` -> ``("dir/000123", "jpg")``; the extension is everything after the
    first dot of the base name, lower-cased (``"a.seg.png"`` -> ``"seg.png"``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _tar_samples(path: Path, prefix: str) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile() or Path(m.name).name.startswith("."):
                    continue
                key, ext = split_key(m.name)
                if ext:
                    groups.setdefault(f"{prefix}/{key}" if prefix else key, {})[ext] = Member(
                        str(path), m.offset_data, m.size)
    except tarfile.TarError as e:
        raise ValueError(f"{path} is not a readable (uncompressed) tar file ({e}); re-download or regenerate it") from e
    return groups


def index_samples(root: str | os.PathLike) -> list[Sample]:
    """All samples under ``root`` (a ``.tar`` file, or a folder holding ``.tar`` shards and/or
    loose files with the extensions in ``LOOSE_EXTS``), sorted by id. Hidden files and
    folders (``.staging`` etc.) are ignored."""
    root = Path(root)
    groups: dict[str, dict] = {}
    if root.is_file():
        if root.suffix != ".tar":
            raise ValueError(f"data root {root} is a file but not a .tar shard; pass a .tar file or a folder")
        groups.update(_tar_samples(root, ""))
    elif root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(root).as_posix()
            rel = "" if rel == "." else rel + "/"
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                if name.endswith(".tar"):
                    groups.update(_tar_samples(path, rel + name[: -len(".tar")]))
                    continue
                key, ext = split_key(rel + name)
                if ext in LOOSE_EXTS:
                    groups.setdefault(key, {})[ext] = Member(str(path))
    else:
        raise FileNotFoundError(f"data root {root} does not exist")
    return [Sample(sid, files) for sid, files in sorted(groups.items())]


# ------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------

def _file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (0o666 less the umask)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on
    failure removed. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Each tensor is copied to its own compact CPU buffer (rows of a batch become separate files)."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def write_tar_atomic(path: str | os.PathLike, samples: list[tuple[str, dict]]) -> None:
    """Write a webdataset shard: ``samples`` is ``[(key, {ext: bytes}), ...]``, members are
    ``<key>.<ext>`` in the given order."""
    now = time.time()
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tf.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------
# torchrun sharding
# ------------------------------------------------------------------------------------------

def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment torchrun / accelerate set;
    ``(0, 1, 0)`` when run as a plain process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not within WORLD_SIZE={world}; launch with torchrun --nproc_per_node=N")
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


def rank_device(local_rank: int, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """This process's device (``cuda:LOCAL_RANK`` when CUDA is there, else the CPU) and the
    dtype named ``dtype`` (default: bfloat16 on CUDA, float32 on the CPU)."""
    import torch

    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return device, getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))
