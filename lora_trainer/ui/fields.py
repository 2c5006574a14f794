"""Widgets <-> config, by field name only.

Gradio hands a callback its input values by position. Everything positional
stays in `Widgets`: components are registered under a key ("model",
"params.rank", "concept1.instance_prompt", ...), a callback is wired with a list
of keys, and the values come back as a dict keyed the same way. Moving a widget
on the page therefore cannot send its value to another setting.

`FieldSpec` describes the widget of one config field from the field's metadata
(label, help, choices, limits, advanced) in `lora_trainer.config`; the
conversions here turn widget values into a validated config and back. No
gradio in this module.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..config import Concept, TrainingParams
from ..errors import ConfigError

CONCEPT_SLOTS = 3
# Fields of TrainingParams that live in the left column, not on the Parameters tab.
LEFT_COLUMN_PARAMS = ("custom_model_name",)


@dataclass(frozen=True)
class FieldSpec:
    """How one config field is shown: widget kind, label, tooltip, limits."""

    name: str
    kind: str                 # "checkbox", "dropdown", "number", "textbox"
    label: str
    help: str
    default: Any
    type: type
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    advanced: bool = False


def field_specs(cls, exclude: Iterable[str] = ()) -> dict[str, FieldSpec]:
    """The widget description of every field of the config class `cls`, in declaration order."""
    specs = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        meta, kind_type = f.metadata, type(f.default)
        if meta.get("choices"):
            kind = "dropdown"
        elif kind_type is bool:
            kind = "checkbox"
        elif kind_type in (int, float):
            kind = "number"
        else:
            kind = "textbox"
        specs[f.name] = FieldSpec(f.name, kind, meta["label"], meta["help"], f.default, kind_type,
                                  meta.get("choices"), meta.get("minimum"), meta.get("maximum"),
                                  bool(meta.get("advanced")))
    return specs


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """The value a widget shows for a config value."""
    if spec.type is float:
        return float(value)
    return value


def from_widget(spec: FieldSpec, raw: Any, where: str = "") -> Any:
    """The config value of what a widget holds. Raises ConfigError naming the label."""
    label = f"{where}{spec.label} ('{spec.name}')"
    if spec.type is bool:
        return bool(raw)
    if spec.type is str:
        return "" if raw is None else str(raw)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ConfigError(f"{label}: give a number")
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{label}: {raw!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{label}: must be a finite number, got {raw!r}")
    if spec.type is int:
        if number != int(number):
            raise ConfigError(f"{label}: must be a whole number, got {raw!r}")
        return int(number)
    return number


def config_from_values(cls, values: dict[str, Any], *, base=None, where: str = ""):
    """Build config `cls` from widget values keyed by field name; fields not given come from `base`.

    Raises ConfigError naming the field for a bad value (type, choice or limit).
    """
    specs = field_specs(cls)
    unknown = set(values) - set(specs)
    if unknown:
        raise KeyError(f"not fields of {cls.__name__}: {', '.join(sorted(unknown))}")
    data = dataclasses.asdict(base) if base is not None else {}
    data.update({name: from_widget(specs[name], raw, where) for name, raw in values.items()})
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def values_from_config(obj, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Widget values of a config object, keyed by field name."""
    specs = field_specs(type(obj))
    names = list(specs) if names is None else list(names)
    return {name: to_widget(specs[name], getattr(obj, name)) for name in names}


def param_specs() -> dict[str, FieldSpec]:
    """The Parameters tab: every TrainingParams field but those in the left column."""
    return field_specs(TrainingParams, exclude=LEFT_COLUMN_PARAMS)


def concept_key(slot: int, name: str) -> str:
    """Widget key of a concept field; slots count from 1 like the "Concept 1" tab."""
    return f"concept{slot}.{name}"


def params_key(name: str) -> str:
    return f"params.{name}"


class Widgets:
    """Components registered by key; the one place where gradio's positional values get names."""

    def __init__(self):
        self.by_key: dict[str, Any] = {}

    def add(self, key: str, component: Any) -> Any:
        if key in self.by_key:
            raise KeyError(f"widget {key!r} registered twice")
        self.by_key[key] = component
        return component

    def __getitem__(self, key: str) -> Any:
        return self.by_key[key]

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.by_key if k.startswith(prefix)]

    def components(self, keys: Sequence[str]) -> list[Any]:
        return [self.by_key[k] for k in keys]

    @staticmethod
    def named(keys: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
        """The values gradio passed for `components(keys)`, keyed by widget key."""
        if len(keys) != len(values):
            raise ValueError(f"{len(values)} values for {len(keys)} widgets")
        return dict(zip(keys, values))


def params_from_named(named: dict[str, Any]) -> TrainingParams:
    """TrainingParams from the widgets "params.<field>" (and "custom_model_name" of the left column)."""
    values = {k.split(".", 1)[1]: v for k, v in named.items() if k.startswith("params.")}
    if "custom_model_name" in named:
        values["custom_model_name"] = named["custom_model_name"]
    return config_from_values(TrainingParams, values)


def concepts_from_named(named: dict[str, Any]) -> list[Concept]:
    """The concepts of the "Concept 1..3" tabs, one per slot (empty slots included)."""
    concepts = []
    for slot in range(1, CONCEPT_SLOTS + 1):
        prefix = f"concept{slot}."
        values = {k[len(prefix):]: v for k, v in named.items() if k.startswith(prefix)}
        concepts.append(config_from_values(Concept, values, where=f"Concept {slot} "))
    return concepts


def named_from_params(params: TrainingParams, keys: Iterable[str]) -> dict[str, Any]:
    """Widget values for the keys among `keys` that show a TrainingParams field."""
    values = values_from_config(params)
    out = {}
    for key in keys:
        name = key.split(".", 1)[1] if key.startswith("params.") else key
        if (key.startswith("params.") or key in LEFT_COLUMN_PARAMS) and name in values:
            out[key] = values[name]
    return out


def named_from_concepts(concepts: list[Concept], keys: Iterable[str]) -> dict[str, Any]:
    """Widget values of the concept slots; slots beyond `concepts` are reset to an empty concept.

    Raises ConfigError when there are more concepts than slots.
    """
    if len(concepts) > CONCEPT_SLOTS:
        raise ConfigError(f"Concepts: {len(concepts)} concepts given; the UI holds {CONCEPT_SLOTS}")
    filled = list(concepts) + [Concept()] * (CONCEPT_SLOTS - len(concepts))
    out = {}
    for key in keys:
        if key.startswith("concept") and "." in key:
            slot, name = key.split(".", 1)
            out[key] = values_from_config(filled[int(slot[len("concept"):]) - 1], [name])[name]
    return out
