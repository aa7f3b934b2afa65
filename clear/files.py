"""The one atomic writer: every file the project writes goes through :func:`atomic_path`.

A file is written to a temporary name in its own folder (``.<name>.<random>.tmp``) and renamed
into place (``os.replace``) once complete, so a killed job leaves either the old file or the
new one, never a truncated one; on failure the temporary file is removed.

Permissions are those of a plain ``open(path, "w")``: a new file gets ``0o666`` less the
current umask (``mkstemp`` alone would leave it ``0o600``, readable by its owner only), and
replacing an existing file keeps that file's permission bits, as overwriting it in place
would. Parent folders are created.

The helpers write bytes, text, JSON, safetensors, PIL images and uncompressed tar files.
This module imports nothing heavy at import time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tarfile
import tempfile
import time
from pathlib import Path

__all__ = ["new_file_mode", "atomic_path", "write_bytes", "write_text", "write_json", "save_safetensors",
           "save_image", "write_tar"]


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def new_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def _target_mode(path: Path) -> int:
    """What a plain overwrite of ``path`` would leave: an existing file's own permission bits, else a new file's."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return new_file_mode()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else new_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path`` to write to; on success it gets the permissions
    of a plain write (see the module docstring) and is renamed to ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` and a final newline."""
    return write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def _compact(t):
    """``t`` on the CPU, contiguous and owning its whole storage (safetensors refuses views that
    share a buffer, e.g. the rows of a batch, and would write a slice's whole buffer)."""
    import torch  # here: clear.files stays torch-free

    t = t.detach().to("cpu")
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """A ``.safetensors`` file of ``tensors`` (moved to the CPU; views copied to their own buffer)."""
    from safetensors.torch import save_file  # here: clear.files stays torch-free

    tensors = {k: _compact(v) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def save_image(image, path: str | os.PathLike, format: str = "PNG", **save_kwargs) -> Path:
    """A PIL image (``image.save(tmp, format=format, **save_kwargs)``, e.g. ``pnginfo=``, ``quality=``)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=format, **save_kwargs)
    return Path(path)


def write_tar(path: str | os.PathLike, samples: list[tuple[str, dict]]) -> Path:
    """An uncompressed tar (a webdataset shard): ``samples`` is ``[(key, {ext: bytes}), ...]``,
    the members are ``<key>.<ext>`` in the given order, each with mode 0o644."""
    now = time.time()
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tf.addfile(info, io.BytesIO(data))
    return Path(path)
