"""Training samples on disk: webdataset tar shards or a folder of loose files, read in place.

A sample is a group of files sharing a key (the webdataset convention: the key is the
file name up to its first dot, so ``000123.jpg`` and ``000123.json`` are one sample with
the extensions ``jpg`` and ``json``). Tars are indexed, never unpacked: a member is read
by seeking to its offset, so a downloaded shard such as text-to-image-2M's
``data_1024_10K/data_000000.tar`` is used as is.

Every sample has an id unique under the data root: ``<tar path without .tar>/<key>`` for
a tar member, ``<relative path of the key>`` for loose files. Feature caches mirror ids
(``<cache_dir>/<kind>/<id>.safetensors``), so caches stay valid when shards are added.

Writes go through :mod:`clear.files` (atomic, with the permissions of a plain write): a killed
job leaves either the old state or the new file, never a truncated one.

Names are checked, since caches are written at paths made from them: a shard with a member whose name is
absolute or holds a ``..`` component, or with a link member, is refused with one line naming it
(:func:`unsafe_name`), as is a loose file or shard that is a link to somewhere outside the data root. Only
members with the extensions in ``SAMPLE_EXTS`` make up samples; others are ignored.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAMPLE_EXTS = IMAGE_EXTS + ("json", "txt")  # the files that make up samples, loose or in tars


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


def unsafe_name(name: str) -> str | None:
    """Why ``name`` (a tar member's or a sample id) could lead outside the folder it is joined to:
    ``"an absolute path"``, ``"a '..' component"``; None when it cannot."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 2 and name[1] == ":" and name[2] in "/\\"):  # C:\\...
        return "an absolute path"
    if ".." in parts:
        return "a '..' component"
    if "\x00" in name:
        return "a name with a NUL byte"
    return None


def _refuse_member(path: Path, name: str, why: str) -> ValueError:
    return ValueError(f"{path}: member {name!r} is {why}; a data shard holds plain files with relative names "
                      "(<key>.jpg, <key>.json): remove the shard from the data root, or rebuild it with "
                      "scripts/generate_data.py")


def _tar_samples(path: Path, prefix: str) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                why = unsafe_name(m.name)
                if why is None and (m.issym() or m.islnk()):
                    why = f"a link (to {m.linkname!r})"
                if why is not None:
                    raise _refuse_member(path, m.name, why)
                name = m.name.removeprefix("./")
                if not m.isfile() or Path(name).name.startswith("."):
                    continue
                key, ext = split_key(name)
                if ext in SAMPLE_EXTS:
                    groups.setdefault(f"{prefix}/{key}" if prefix else key, {})[ext] = Member(
                        str(path), m.offset_data, m.size)
    except tarfile.TarError as e:
        raise ValueError(f"{path} is not a readable (uncompressed) tar file ({e}); re-download or regenerate it") from e
    return groups


def _check_inside(path: Path, root: Path) -> None:
    """A loose file or shard that is a link must point inside the data root (resolved)."""
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root):
            raise ValueError(f"{path} is a link to {target}, outside the data root {root}: copy the file into the "
                             "data root, or pass the folder it is in as --data_root")


def index_samples(root: str | os.PathLike) -> list[Sample]:
    """All samples under ``root`` (a ``.tar`` file, or a folder holding ``.tar`` shards and/or
    loose files with the extensions in ``SAMPLE_EXTS``), sorted by id. Hidden files and
    folders (``.staging`` etc.) are ignored. Raises ``ValueError`` naming an unreadable shard, a member
    name that could lead outside (:func:`unsafe_name`), a link member, or a link out of ``root``."""
    root = Path(root)
    groups: dict[str, dict] = {}
    inside = root.resolve()
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
                _check_inside(path, inside)
                why = unsafe_name(rel + name)  # only a literal "\\" in a file name can lead out here
                if why is not None:
                    raise ValueError(f"{path}: its name could lead outside the cache folder ({why}, reading '\\' as a "
                                     "folder separator); rename the file")
                if name.endswith(".tar"):
                    groups.update(_tar_samples(path, rel + name[: -len(".tar")]))
                    continue
                key, ext = split_key(rel + name)
                if ext in SAMPLE_EXTS:
                    groups.setdefault(key, {})[ext] = Member(str(path))
    else:
        raise FileNotFoundError(f"data root {root} does not exist")
    return [Sample(sid, files) for sid, files in sorted(groups.items())]


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
