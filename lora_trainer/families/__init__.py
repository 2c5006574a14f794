"""Model families, one module each behind the interface in `base.py`.

`FAMILIES` lists them; `family_of(model_type)` and `detect(reader)` are how
the rest of the core finds the one it deals with. A new family is a new module
added to `FAMILIES`.
"""
from __future__ import annotations

from ..errors import CheckpointError
from .base import UNET_PREFIX, VAE_PREFIX, Family, ModelSpec, TextEncoder
from .sd1 import SD1, parse_yaml
from .sd2 import SD2
from .sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SD1(), SD2(), SDXL())

__all__ = ["FAMILIES", "UNET_PREFIX", "VAE_PREFIX", "Family", "ModelSpec", "TextEncoder", "all_model_types",
           "detect", "family_named", "family_of", "family_of_config", "parse_yaml"]


def all_model_types() -> tuple[str, ...]:
    return tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str) -> Family:
    """The family of a model type ("sd1", "sd2-v", "sdxl", or a provisional one such as "sd2?").

    Raises KeyError for an unknown model type.
    """
    for family in FAMILIES:
        if model_type in family.model_types or model_type == family.provisional:
            return family
    raise KeyError(f"unknown model type {model_type!r}")


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"unknown model family {name!r}")


def detect(reader) -> tuple[Family, str]:
    """The family and model type of a checkpoint, from its weights' names and shapes.

    Raises CheckpointError for a file that is no Stable Diffusion model, one of
    no known family, or a variant a family refuses (with the reason).
    """
    keys = set(reader.keys())
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(f"{reader.path}: no Stable Diffusion UNet weights (model.diffusion_model.*) in this file")
    for family in FAMILIES:
        if family.claims(keys):
            return family, family.detect(reader)
    names = ", ".join(f.title for f in FAMILIES)
    raise CheckpointError(f"{reader.path}: not a recognised checkpoint ({names}); "
                          "put its original .yaml config beside it with the same base name")


def family_of_config(root: dict, source: str) -> Family:
    """The family an original yaml describes; raises CheckpointError naming `source` when none does."""
    for family in FAMILIES:
        if family.claims_config(root):
            return family
    raise CheckpointError(f"{source}: not an original Stable Diffusion config of a known family "
                          f"({', '.join(f.title for f in FAMILIES)})")
