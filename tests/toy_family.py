"""A third model family, added the way docs/architecture.md says: this one file, plus one registry entry
(``clear.families.make_table(..., toy_family.FAMILY)``; the tests monkeypatch ``clear.families.FAMILIES``).

The toy model is a renamed FLUX transformer, so the family reuses FLUX's processor and methods;
what makes it its own family is its name, its classes and its one released model (spec)."""

from __future__ import annotations

import dataclasses

from diffusers import FluxTransformer2DModel

from clear.families import ModelSpec, flux


class ToyTransformer2DModel(FluxTransformer2DModel):
    """A FLUX transformer under another name."""


class ToyFamily(flux.FluxFamily):
    def transformer_cls(self):
        return ToyTransformer2DModel


SPEC = ModelSpec("Toy-1", lambda config: True, steps=3, guidance=2.0, max_sequence_length=16,
                 training_tokens=8 * 8 + 16)

FAMILY = ToyFamily(**{**{f.name: getattr(flux.FAMILY, f.name) for f in dataclasses.fields(flux.FAMILY)},
                      "name": "toy", "transformer_class": "ToyTransformer2DModel",
                      "model_classes": ("ToyTransformer2DModel",), "specs": (SPEC,), "released_weights": False,
                      "example": "toy/toy-1"})
