"""The model families CLEAR supports, one file each, and the one registry that finds them.

:data:`FAMILIES` maps family names to :class:`ModelFamily` objects, in order; it is the only
place that lists families. :func:`family_of` finds the family of a transformer (by the classes
of its MRO), a pipeline, a ``model_index.json`` dict or a pipeline folder / Hub id;
:func:`family_of_checkpoint` the family a CLEAR checkpoint was made for.

Adding a family = one file ``clear/families/<name>.py`` (its processor, a :class:`ModelFamily`
subclass and its ``FAMILY`` instance with the :class:`ModelSpec` of each released model) and one
entry in the :func:`make_table` call below.
"""

from __future__ import annotations

import os
from collections import Counter
from types import MappingProxyType
from typing import Iterable, Mapping

import torch

from . import flux, flux2, qwenimage, sd3, wan
from .base import ModelFamily, ModelSpec

__all__ = ["FAMILIES", "ModelFamily", "ModelSpec", "family_of", "family_of_checkpoint", "get_family", "make_table",
           "resolve_family"]


def make_table(*families: ModelFamily) -> Mapping[str, ModelFamily]:
    """A read-only registry of ``families`` by name, in order; names and recognised classes must be unique."""
    classes = [c for f in families for c in f.model_classes]
    names = [f.name for f in families]
    for kind, values in (("name", names), ("model class", classes)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{kind} {', '.join(repeated)} claimed by more than one model family: give each family "
                             "its own name and classes")
    return MappingProxyType({f.name: f for f in families})


FAMILIES: Mapping[str, ModelFamily] = make_table(flux.FAMILY, sd3.FAMILY, flux2.FAMILY, qwenimage.FAMILY,
                                                wan.FAMILY)


def get_family(name: str | ModelFamily) -> ModelFamily:
    """The family called ``name`` (a :class:`ModelFamily` is returned as it is)."""
    if isinstance(name, ModelFamily):
        return name
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _by_class(class_name: str | None) -> ModelFamily | None:
    return next((f for f in FAMILIES.values() if class_name in f.model_classes), None)


def _supported() -> str:
    return ", ".join(sorted(c for f in FAMILIES.values() for c in f.model_classes))


def _of_config(config: Mapping) -> ModelFamily | None:
    """A ``model_index.json`` (its ``transformer`` entry) or a transformer ``config.json`` (``_class_name``)."""
    entry = config.get("transformer")
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return _by_class(entry[1])
    return _by_class(config.get("_class_name")) if "transformer" not in config else None


def _of_path(path: str | os.PathLike) -> ModelFamily | None:
    """The family of a pipeline folder / Hub id, from ``model_index.json`` or ``transformer/config.json``."""
    from diffusers import ConfigMixin, DiffusionPipeline  # here: the registry imports no diffusers model

    path = str(path)
    try:
        found = _of_config(DiffusionPipeline.load_config(path))
        if found is not None:
            return found
    except (OSError, ValueError):
        pass

    class _Config(ConfigMixin):
        config_name = "config.json"

    try:
        return _of_config(_Config.load_config(path, subfolder="transformer"))
    except (OSError, ValueError):
        return None


def family_of(obj) -> ModelFamily:
    """The family of a transformer / ControlNet (the first class of its MRO that a family
    recognises), a pipeline (its transformer), a ``model_index.json`` or transformer config dict,
    or a pipeline folder / Hub id (its ``model_index.json``, else ``transformer/config.json``)."""
    if isinstance(obj, torch.nn.Module):
        for cls in type(obj).__mro__:
            found = _by_class(cls.__name__)
            if found is not None:
                return found
        raise TypeError(f"CLEAR does not support {type(obj).__name__}; supported: {_supported()}")
    if hasattr(obj, "transformer") and not isinstance(obj, Mapping):
        return family_of(obj.transformer)
    found = _of_config(obj) if isinstance(obj, Mapping) else _of_path(obj)
    if found is None:
        where = "this config" if isinstance(obj, Mapping) else f"{obj} (its model_index.json / transformer config)"
        raise ValueError(f"cannot tell the model family of {where}: it names none of {_supported()}")
    return found


def resolve_family(family: str | ModelFamily | None, pretrained_model_name_or_path: str | os.PathLike) -> ModelFamily:
    """``family`` (``"flux"``, ``"sd3"``, a :class:`ModelFamily`, or ``None`` / ``"auto"``: read it from
    the model, :func:`family_of`). A family that contradicts the model's own config is an error."""
    if isinstance(family, ModelFamily):
        family = family.name
    detected = _of_path(pretrained_model_name_or_path)
    if family in (None, "auto"):
        if detected is None:
            raise ValueError(f"cannot tell the model family of {pretrained_model_name_or_path}: neither its "
                             f"model_index.json nor transformer/config.json names one of "
                             f"{', '.join(f.transformer_class for f in FAMILIES.values())}; pass --model_family "
                             f"({' or '.join(FAMILIES)})")
        return detected
    family = get_family(family)
    if detected is not None and detected is not family:
        raise ValueError(f"{pretrained_model_name_or_path} is a {detected.name} model ({detected.transformer_class}), "
                         f"not {family.name}: drop --model_family or pass --model_family {detected.name}")
    return family


def family_of_checkpoint(metadata: Mapping[str, str], keys: Iterable[str]) -> str | None:
    """The name of the family a CLEAR checkpoint (its header: metadata and tensor keys, as
    :func:`clear.weights.read_header` gives them) was made for: its ``clear.family`` metadata
    (written by :func:`clear.save_clear_weights`; returned as written, registered or not), else
    the first family (registry order) whose own block lists, those not every family has, the
    keys use (FLUX's ``single_transformer_blocks``: the released files; Wan's ``blocks``; a list most families
    have, ``transformer_blocks``, says nothing); ``None`` where the file
    does not say."""
    if "clear.family" in metadata:
        return metadata["clear.family"]
    used = {k.split(".", 1)[0] for k in keys}
    counts = Counter(b for f in FAMILIES.values() for b in f.block_lists)
    common = {b for b, n in counts.items() if n > len(FAMILIES) / 2}  # most families have it: it says nothing
    return next((f.name for f in FAMILIES.values() if used & (set(f.block_lists) - common)), None)
