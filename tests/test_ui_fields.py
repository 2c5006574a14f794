"""Widgets <-> config: every field round-trips through its real gradio widget, by name, never by position."""
from __future__ import annotations

import dataclasses
import random
import shutil

import pytest

from lora_trainer import presets
from lora_trainer.config import Concept, TrainingParams, field_meta
from lora_trainer.errors import ConfigError
from lora_trainer.ui import fields
from lora_trainer.ui.fields import (CONCEPT_SLOTS, Widgets, concept_key, concepts_from_named, config_from_values,
                                    field_specs, param_specs, params_from_named, params_key, values_from_config)

import gradio as gr


def other_value(spec: fields.FieldSpec, salt: int = 0):
    """A valid value different from the default, distinct per field (salt)."""
    if spec.choices:
        return next(c for c in spec.choices if c != spec.default)
    if spec.type is bool:
        return not spec.default
    if spec.type is str:
        return f"value of {spec.name}"
    if spec.type is int:
        value = spec.default + 1 + salt
        return min(value, int(spec.maximum)) if spec.maximum is not None else value
    value = spec.default + 0.125 * (salt + 1)
    return min(value, spec.maximum) if spec.maximum is not None else value


def changed(cls):
    """An instance of `cls` with every field changed from its default (resolution kept a multiple of 8)."""
    values = {}
    for salt, spec in enumerate(field_specs(cls).values()):
        value = other_value(spec, salt)
        if spec.name == "resolution":
            value = spec.default + 8
        values[spec.name] = value
    return cls(**values)


def through_widget(component, value):
    """What the server gets back after showing `value` in the widget and reading it again."""
    return component.preprocess(component.postprocess(value))


@pytest.fixture(scope="module")
def built():
    """Real gradio components for every TrainingParams and Concept field, as the tab makes them."""
    from lora_trainer.ui.widgets import field_widget

    with gr.Blocks():
        params = {s.name: field_widget(s, f"p_{s.name}") for s in field_specs(TrainingParams).values()}
        concept = {s.name: field_widget(s, f"c_{s.name}") for s in field_specs(Concept).values()}
    return {TrainingParams: params, Concept: concept}


@pytest.mark.parametrize("cls", [TrainingParams, Concept])
def test_every_field_has_a_widget_with_its_label_help_and_default(cls, built):
    widgets = built[cls]
    assert set(widgets) == {f.name for f in dataclasses.fields(cls)}
    defaults = cls()
    for name, component in widgets.items():
        meta = field_meta(cls, name)
        assert component.label == meta["label"]
        assert meta["help"] in (getattr(component, "info", None) or ""), name
        assert component.value == getattr(defaults, name), name
        if meta["choices"]:
            shown = [c[1] if isinstance(c, (tuple, list)) else c for c in component.choices]
            assert shown == list(meta["choices"])


@pytest.mark.parametrize("cls", [TrainingParams, Concept])
def test_every_field_round_trips_through_its_widget(cls, built):
    original = changed(cls)
    assert all(getattr(original, f.name) != f.default for f in dataclasses.fields(cls))
    shown = values_from_config(original)
    read_back = {name: through_widget(built[cls][name], value) for name, value in shown.items()}
    assert config_from_values(cls, read_back) == original


def test_defaults_of_the_widgets_make_the_default_config(built):
    values = {name: through_widget(c, c.value) for name, c in built[TrainingParams].items()}
    assert config_from_values(TrainingParams, values) == TrainingParams()


def all_keys() -> list[str]:
    keys = [params_key(n) for n in param_specs()] + ["custom_model_name"]
    keys += [concept_key(slot, n) for slot in range(1, CONCEPT_SLOTS + 1) for n in field_specs(Concept)]
    return keys


def values_for(keys, params: TrainingParams, concepts: list[Concept]) -> list:
    named = {**fields.named_from_params(params, keys), **fields.named_from_concepts(concepts, keys)}
    return [named[k] for k in keys]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reordering_the_widgets_cannot_swap_values(seed):
    params = changed(TrainingParams)
    concepts = [changed(Concept), Concept(instance_data_dir="/pictures/2", instance_prompt="b", num_class_images=3)]
    keys = all_keys()
    random.Random(seed).shuffle(keys)  # the page lays the widgets out in another order
    w = Widgets()
    for key in keys:
        w.add(key, object())
    assert w.keys() == keys
    named = Widgets.named(keys, values_for(keys, params, concepts))
    assert params_from_named(named) == params
    assert concepts_from_named(named) == concepts + [Concept()]


def test_named_values_refuse_a_wrong_count():
    with pytest.raises(ValueError, match="2 values for 3 widgets"):
        Widgets.named(["a", "b", "c"], [1, 2])


def test_a_widget_key_cannot_be_registered_twice():
    w = Widgets()
    w.add("params.rank", object())
    with pytest.raises(KeyError, match="twice"):
        w.add("params.rank", object())


@pytest.mark.parametrize("name, raw, message", [
    ("rank", None, "Lora UNET Rank \\('rank'\\): give a number"),
    ("rank", 2.5, "must be a whole number"),
    ("rank", 0, "at least 1"),
    ("learning_rate", float("nan"), "finite"),
    ("resolution", 100, "multiple of 8"),
    ("mixed_precision", "fp8", "must be one of no, fp16, bf16"),
])
def test_bad_widget_values_name_the_field(name, raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_values(TrainingParams, {name: raw})


def test_concept_errors_name_the_concept_tab():
    keys = [concept_key(2, "num_class_images")]
    with pytest.raises(ConfigError, match="Concept 2 .*Total Number of Class/Reg Images"):
        concepts_from_named(Widgets.named(keys, [-1]))


def test_too_many_concepts_for_the_slots_are_refused():
    with pytest.raises(ConfigError, match="4 concepts"):
        fields.named_from_concepts([Concept()] * 4, all_keys())


def test_custom_model_name_is_in_the_left_column_not_the_parameters_tab():
    assert "custom_model_name" not in param_specs()
    assert set(param_specs()) | {"custom_model_name"} == {f.name for f in dataclasses.fields(TrainingParams)}


# -- presets ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", presets.preset_names())
def test_every_preset_is_valid(name):
    assert set(presets.PRESETS[name]) <= {f.name for f in dataclasses.fields(TrainingParams)}
    result = presets.apply_preset(TrainingParams(), name)
    assert isinstance(result, TrainingParams)
    for key, value in presets.PRESETS[name].items():
        assert getattr(result, key) == value


def test_the_8gb_preset_is_what_the_reference_recommends():
    p = presets.apply_preset(TrainingParams(num_train_epochs=7), "8 GB GPU")
    assert (p.use_lora, p.mixed_precision, p.use_8bit_adam, p.gradient_checkpointing, p.cache_latents) == \
        (True, "fp16", True, True, True)
    assert p.attention in ("flash_attention", "xformers")
    assert p.train_batch_size == 1 and p.rank == 4
    assert p.num_train_epochs == 7  # a preset leaves the fields it does not name alone


def test_an_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="Preset: 'nope'"):
        presets.apply_preset(TrainingParams(), "nope")


# -- Save Params / Load Params ------------------------------------------------------------
@pytest.fixture
def created(models_dir, tiny_sd1):
    from lora_trainer.checkpoint import create_model

    for p in (tiny_sd1, tiny_sd1.with_suffix(".yaml")):
        shutil.copy(p, models_dir.checkpoints / p.name)
    create_model(models_dir, tiny_sd1.name, "cat")
    return models_dir


def test_save_params_then_load_params_round_trips(created):
    from lora_trainer.hosts import Host
    from lora_trainer.ui.controller import Controller

    ctl = Controller(Host(created))
    keys = all_keys()
    params = changed(TrainingParams)
    concepts = [changed(Concept), Concept(instance_data_dir="/pictures/2", class_prompt="girl", num_class_images=4)]
    named = {"model": "cat", **Widgets.named(keys, values_for(keys, params, concepts))}
    assert ctl.save_params(named).startswith("Saved")

    blank = {"model": "cat", **Widgets.named(keys, values_for(keys, TrainingParams(), []))}
    message, loaded = ctl.load_params(blank, keys)
    assert message.startswith("Loaded"), message
    assert set(loaded) == set(keys)
    assert params_from_named(loaded) == params
    assert concepts_from_named(loaded) == concepts + [Concept()]


def test_load_params_of_a_model_without_saved_params_changes_nothing(created):
    from lora_trainer.hosts import Host
    from lora_trainer.ui.controller import Controller

    message, loaded = Controller(Host(created)).load_params({"model": "cat"}, all_keys())
    assert loaded == {} and "no saved parameters" in message


def test_save_params_without_a_model_says_what_to_do(created):
    from lora_trainer.hosts import Host
    from lora_trainer.ui.controller import Controller

    message = Controller(Host(created)).save_params({"model": ""})
    assert message.startswith("Error: Model: choose a model")


def test_on_a_cpu_a_preset_picks_what_is_fastest_there_and_says_so():
    from lora_trainer.optional import bitsandbytes_runs_on_cpu

    p, notes = presets.apply_preset_noted(TrainingParams(), "8 GB GPU", cuda=False)
    assert (p.mixed_precision, p.gradient_checkpointing) == ("no", False)  # fp32, no checkpointing
    assert p.use_8bit_adam == bitsandbytes_runs_on_cpu()  # bitsandbytes >= 0.50 runs on the CPU
    assert [n.split(":")[0] for n in notes] == ["Mixed Precision fp16 -> no (fp32)", "Gradient Checkpointing on -> off"] \
        + ([] if bitsandbytes_runs_on_cpu() else ["Use 8bit Adam on -> off"])
    assert (p.rank, p.cache_latents) == (4, True)  # the rest of the preset as it is
    p, notes = presets.apply_preset_noted(TrainingParams(), "CPU / test", cuda=False)
    assert p.mixed_precision == "no" and notes == []
    assert presets.apply_preset_noted(TrainingParams(), "8 GB GPU", cuda=True)[1] == []
