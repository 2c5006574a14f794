"""Issue 15's features are each a field with a label and help, a widget of the Parameters or Concepts tab and a
command-line flag (the tab and the `train` command read the same metadata), and each is off by default; of the
presets only "Adaptive" turns one on (Prodigy)."""
from __future__ import annotations

import dataclasses

import pytest

from lora_trainer import presets
from lora_trainer.cli import build_parser
from lora_trainer.cli._concepts import CONCEPT_FLAGS, concepts_from_args
from lora_trainer.cli.train import params_from_args
from lora_trainer.config import Concept, TrainingParams, field_meta

# feature -> {field: (its "off" default, a value that turns it on or changes it, as typed on the command line)}
PARAM_FEATURES = {
    "validation": {"validation_split": (0.0, "0.2"), "validation_every_n_steps": (0, "5")},
    "caption augmentation": {"shuffle_caption": (False, None), "keep_tokens": (0, "2"),
                             "caption_tag_dropout_rate": (0.0, "0.1"), "caption_dropout_rate": (0.0, "0.05")},
    "masked loss": {"masked_loss": (False, None)},
    "EMA": {"use_ema": (False, None), "ema_decay": (0.999, "0.99")},
    "saving": {"save_every_n_epochs": (0, "2"), "keep_last_n_saves": (0, "3"),
               "sample_grid_prompts": ("", "a scs girl"), "sample_grid_seeds": ("1, 2", "7, 8, 9")},
    "LoCon/DoRA": {"conv_rank": (0, "8"), "conv_alpha": (1.0, "4"), "use_dora": (False, None)},
    "optimizers": {"optimizer": ("AdamW", "Prodigy"), "prodigy_d_coef": (1.0, "0.5"),
                   "prodigy_safeguard_warmup": (False, None), "prodigy_use_bias_correction": (False, None)},
}
CONCEPT_FEATURES = {"validation": {"validation_data_dir": ("", "/pictures/held-out")}}
# The fields that switch a feature on; each must be off after every preset but the ones named here.
SWITCHES = ["validation_split", "shuffle_caption", "caption_tag_dropout_rate", "caption_dropout_rate", "masked_loss",
            "use_ema", "save_every_n_epochs", "keep_last_n_saves", "sample_grid_prompts", "conv_rank", "use_dora",
            "optimizer"]
TURNED_ON_BY = {"optimizer": {"Adaptive"}}

PARAM_CASES = [(feature, name, *values) for feature, fields in PARAM_FEATURES.items()
               for name, values in fields.items()]


def _train_args(*flags: str):
    return build_parser().parse_args(["train", "--models-dir", "models", "--model", "m", *flags])


@pytest.mark.parametrize("feature,name,off,typed", PARAM_CASES, ids=[c[1] for c in PARAM_CASES])
def test_each_parameter_has_help_a_widget_and_a_flag_and_is_off_by_default(feature, name, off, typed, tmp_path,
                                                                         capsys):
    from lora_trainer.ui.fields import param_specs

    meta = field_meta(TrainingParams, name)
    assert meta["label"] and len(meta["help"]) > 20, (feature, name)
    assert getattr(TrainingParams(), name) == off
    spec = param_specs()[name]
    assert (spec.label, spec.help) == (meta["label"], meta["help"])  # the tab shows the same words
    flag = meta["cli"] or f"--{name}"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert f"{flag} " in capsys.readouterr().out.replace("\n", " ")
    args = _train_args(flag, typed) if typed is not None else _train_args(flag)
    (tmp_path / "params.json").write_text("{}")
    expected = True if typed is None else type(off)(typed)
    assert getattr(params_from_args(args, tmp_path), name) == expected != off
    if typed is None:  # a switch: --no-<flag> turns it off again
        assert getattr(params_from_args(_train_args(f"--no-{name}"), tmp_path), name) is False


@pytest.mark.parametrize("name", list(CONCEPT_FEATURES["validation"]))
def test_each_concept_field_has_help_a_widget_and_a_flag_and_is_off_by_default(name, tmp_path):
    from lora_trainer.ui.fields import field_specs

    off, typed = CONCEPT_FEATURES["validation"][name]
    meta = field_meta(Concept, name)
    assert meta["label"] and len(meta["help"]) > 20 and getattr(Concept(), name) == off
    assert field_specs(Concept)[name].help == meta["help"]
    assert name in CONCEPT_FLAGS
    args = _train_args("--instance_data_dir", "/pictures", f"--{name}", typed)
    assert getattr(concepts_from_args(args, tmp_path)[0], name) == typed


@pytest.mark.parametrize("preset", presets.preset_names())
def test_only_the_adaptive_preset_turns_a_feature_on(preset):
    applied = presets.apply_preset(TrainingParams(), preset, cuda=True)
    defaults = TrainingParams()
    turned_on = {name for name in SWITCHES if getattr(applied, name) != getattr(defaults, name)}
    assert turned_on == {name for name, presets_ in TURNED_ON_BY.items() if preset in presets_}


def test_the_table_names_every_field_issue_15_added():
    """A new feature field must join the table above (and so get these checks)."""
    listed = {name for fields in PARAM_FEATURES.values() for name in fields}
    added_by_issue_15 = {f.name for f in dataclasses.fields(TrainingParams)
                         if f.name.startswith(("validation", "caption", "sample_grid", "prodigy", "ema", "use_ema",
                                               "conv_", "use_dora", "masked", "shuffle", "keep_"))}
    assert added_by_issue_15 <= listed, added_by_issue_15 - listed
