"""Gradio components made from `FieldSpec`s, with options that cannot run here disabled.

The tooltip of every widget is the field's help text (gradio's `info`, shown
under the label, and the element's title). An option whose optional package
is missing (xformers, bitsandbytes) is disabled and says why.
"""
from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from . import gradio_compat as compat
from .fields import FieldSpec

log = logging.getLogger(__name__)

# Optional feature (keys of optional.optional_features) -> the widget values it makes possible.
FEATURE_OPTIONS = {
    "cuda": (("mixed_precision", "fp16"),),
    "xformers": (("attention", "xformers"),),
    "bitsandbytes": (("use_8bit_adam", True),),
    "prodigyopt": (("optimizer", "Prodigy"),),
}


def unavailable_features() -> dict[str, str]:
    """Optional feature -> why it cannot run here; empty when the check itself is not there."""
    try:
        from ..optional import optional_features
    except ImportError:
        return {}
    try:
        return {name: reason for name, reason in optional_features().items() if reason}
    except Exception as e:  # a broken check must not take the tab down
        log.warning("Could not check the optional features: %s", e)
        return {}


def disabled_options(unavailable: dict[str, str]) -> dict[str, dict[Any, str]]:
    """Field name -> {value that cannot be used: why}."""
    out: dict[str, dict[Any, str]] = {}
    for feature, reason in unavailable.items():
        for name, value in FEATURE_OPTIONS.get(feature, ()):
            out.setdefault(name, {})[value] = f"{value if isinstance(value, str) else feature} unavailable: {reason}"
    return out


def field_widget(spec: FieldSpec, elem_id: str, *, value: Any = None, disabled: dict[Any, str] | None = None) -> Any:
    """The component of one config field, labelled and with its help as tooltip."""
    disabled = disabled or {}
    value = spec.default if value is None else value
    info = " ".join([spec.help, *disabled.values()])
    common = dict(label=spec.label, info=info, elem_id=elem_id, elem_classes=["lora_trainer_field"])
    if spec.kind == "checkbox":
        blocked = True in disabled
        return compat.component(gr.Checkbox, value=bool(value) and not blocked, interactive=not blocked, **common)
    if spec.kind == "dropdown":
        choices = [c for c in spec.choices if c not in disabled]
        return compat.component(gr.Dropdown, choices=choices, value=value if value in choices else choices[0],
                                **common)
    if spec.kind == "number":
        extra = {"precision": 0} if spec.type is int else {}
        limits = {k: v for k, v in (("minimum", spec.minimum), ("maximum", spec.maximum)) if v is not None}
        return compat.component(gr.Number, value=value, **extra, **limits, **common)
    lines = 2 if "prompt" in spec.name else 1
    return compat.component(gr.Textbox, value=value, lines=lines, max_lines=max(lines, 4), **common)
