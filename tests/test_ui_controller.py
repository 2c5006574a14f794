"""What the buttons do, without a browser: class pictures, Generate Ckpt, concepts JSON, errors as messages."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers_hosts import RecordingHost
from lora_trainer.config import Concept
from lora_trainer.ui.fields import CONCEPT_SLOTS, concept_key, field_specs, values_from_config

import gradio  # noqa: F401  (the UI needs it: requirements.txt)


@pytest.fixture
def ctl(models_dir, tiny_sd1):
    from lora_trainer.checkpoint import create_model
    from lora_trainer.ui.controller import Controller

    for p in (tiny_sd1, tiny_sd1.with_suffix(".yaml")):
        shutil.copy(p, models_dir.checkpoints / p.name)
    create_model(models_dir, tiny_sd1.name, "cat")
    ctl = Controller(RecordingHost(models_dir))
    ctl.quick_seconds = 0  # every click answers "Started ..." here; test_a_quick_refusal... times the other answer
    return ctl


def concept_values(*concepts: Concept) -> dict:
    filled = list(concepts) + [Concept()] * (CONCEPT_SLOTS - len(concepts))
    return {concept_key(slot, name): value for slot, concept in enumerate(filled, 1)
            for name, value in values_from_config(concept).items()}


def finish(ctl):
    assert ctl.runner.wait(timeout=120)
    return ctl.state()


def test_generate_class_images_makes_the_missing_pictures_with_the_gpu_lent(ctl, tmp_path):
    concept = Concept(class_prompt="chibi girl", num_class_images=2, class_data_dir=str(tmp_path / "class"),
                      class_infer_steps=2)
    message = ctl.class_images({"model": "cat", **concept_values(concept)})
    assert message.startswith("Started generate class images for 'cat'"), message
    state = finish(ctl)
    assert state.error is None, state.error
    assert state.result == [2, 0, 0]  # per concept slot
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert "Concept requires 2 images." in state.log
    assert ctl.host.calls == ["clear_interrupt", "release_gpu", "restore_gpu"]


def test_class_images_of_concept_2_go_where_training_looks_for_them(ctl):
    """Concept 1 left empty: Concept 2's blank Classification Dataset Directory is the model's classifiers_1."""
    concept = Concept(class_prompt="chibi girl", num_class_images=1, class_infer_steps=2)
    ctl.class_images({"model": "cat", **concept_values(Concept(), concept)})
    state = finish(ctl)
    assert state.error is None, state.error
    folder = ctl.models.model_dir("cat")
    assert len(list((folder / "classifiers_1").glob("*.png"))) == 1
    assert not (folder / "classifiers_0").exists()


def test_generate_ckpt_without_a_lora_writes_the_model_and_refreshes_the_hosts_list(ctl):
    message = ctl.generate_ckpt({"model": "cat", "lora": "", "custom_model_name": "", "half": False, "subdir": True,
                                 "generate_ckpt.overwrite": False})
    assert message.startswith("Started generate ckpt of 'cat'")
    state = finish(ctl)
    assert state.error is None, state.error
    written = ctl.models.checkpoints / "cat" / "cat_0.safetensors"
    assert state.result == written and written.is_file()
    assert ctl.host.calls == ["clear_interrupt", "checkpoints_changed"]
    assert "cat/cat_0.safetensors" in ctl.source_choices()

    # The same again: the file is kept and the message says how to go on.
    ctl.generate_ckpt({"model": "cat", "lora": "", "subdir": True})
    state = finish(ctl)
    assert "already exists" in state.error and "Overwrite" in state.error
    assert ctl.host.calls == ["clear_interrupt", "checkpoints_changed", "clear_interrupt"]  # nothing new to list


def test_generate_ckpt_with_a_missing_lora_fails_with_its_name(ctl):
    ctl.generate_ckpt({"model": "cat", "lora": "nothere.safetensors"})
    state = finish(ctl)
    assert state.error.startswith("Lora Model: 'nothere.safetensors' not found")


def test_buttons_without_a_model_or_concept_answer_with_what_to_do(ctl):
    assert ctl.train({"model": "", **concept_values()}).startswith("Error: Model: choose a model")
    message = ctl.train({"model": "cat", **concept_values()})
    assert message.startswith("Error: Concepts: Concept 1 needs a Dataset Directory")
    assert ctl.create({"create.source": "tiny-sd1.safetensors", "create.name": "../x"}).startswith("Error: Name:")
    message = ctl.class_images({"model": "cat", **concept_values()})
    assert message.startswith("Error: Concepts: Concept 1 needs a Class Prompt")
    assert not ctl.runner.running


def test_create_an_existing_model_needs_overwrite(ctl):
    ctl.create({"create.source": "tiny-sd1.safetensors", "create.name": "cat"})
    assert "already exists" in finish(ctl).error
    ctl.create({"create.source": "tiny-sd1.safetensors", "create.name": "cat", "create.overwrite": True})
    state = finish(ctl)
    assert state.error is None and ctl.selection_after(state) == {"model": "cat"}


def test_concepts_json_round_trip_and_the_dreambooth_extensions_keys(ctl, tmp_path):
    keys = [concept_key(slot, n) for slot in range(1, CONCEPT_SLOTS + 1) for n in field_specs(Concept)]
    first = Concept(instance_data_dir="/pics/a", instance_prompt="chibi scs girl", class_prompt="chibi girl",
                    num_class_images=10)
    second = Concept(instance_data_dir="/pics/b", instance_prompt="b")
    path = tmp_path / "concepts.json"
    message = ctl.save_concepts({"concepts_file": str(path), **concept_values(first, second)})
    assert message == f"Saved 2 concept(s) to {path}"
    message, values = ctl.load_concepts({"concepts_file": str(path)}, keys)
    assert message.startswith("Loaded concepts")
    assert values == concept_values(first, second)

    theirs = tmp_path / "db_concepts.json"
    theirs.write_text(json.dumps([{"instance_data_dir": "/pics/c", "class_images": 5, "num_class_images_per": 2}]))
    _, values = ctl.load_concepts({"concepts_file": str(theirs)}, keys)
    assert (values["concept1.num_class_images"], values["concept1.num_class_images_per_image"]) == (5, 2)

    message, values = ctl.load_concepts({"concepts_file": str(tmp_path / "missing.json")}, keys)
    assert message.startswith("Error:") and "not found" in message and values == {}


def test_a_blank_concepts_file_means_the_models_own(ctl):
    keys = [concept_key(1, "instance_prompt")]
    ctl.save_concepts({"model": "cat", "concepts_file": "", **concept_values(Concept(instance_prompt="p"))})
    assert (ctl.models.model_dir("cat") / "concepts_list.json").is_file()
    message, values = ctl.load_concepts({"model": "cat", "concepts_file": ""}, keys)
    assert values == {"concept1.instance_prompt": "p"}, message


def test_a_preset_leaves_out_what_cannot_run_here(ctl):
    from lora_trainer.config import TrainingParams
    from lora_trainer.optional import bitsandbytes_runs_on_cpu
    from lora_trainer.ui.fields import named_from_params, param_specs, params_from_named, params_key
    from lora_trainer.ui.widgets import disabled_options

    keys = [params_key(n) for n in param_specs()] + ["custom_model_name"]
    named = named_from_params(TrainingParams(num_train_epochs=9), keys)
    disabled = disabled_options({"cuda": "no CUDA GPU", "bitsandbytes": "not installed"})
    message, values = ctl.apply_preset("8 GB GPU", named, keys, disabled, cuda=False)
    params = params_from_named(values)
    # On a CPU: what is fastest there, each change named with its reason.
    assert (params.mixed_precision, params.use_8bit_adam, params.gradient_checkpointing) == ("no", False, False)
    assert params.num_train_epochs == 9
    assert message.startswith("Applied preset '8 GB GPU'. Changed for this machine: ")
    assert "Mixed Precision fp16 -> no (fp32): no CUDA GPU here" in message
    assert "Gradient Checkpointing on -> off: no CUDA GPU here" in message
    assert ("Use 8bit Adam on -> off" in message) == (not bitsandbytes_runs_on_cpu())

    # With CUDA but without bitsandbytes the 8-bit Adam box stays off and the message says why.
    message, values = ctl.apply_preset("8 GB GPU", named, keys, disabled_options({"bitsandbytes": "not installed"}))
    params = params_from_named(values)
    assert (params.mixed_precision, params.use_8bit_adam) == ("fp16", False)
    assert "bitsandbytes unavailable: not installed" in message


def test_options_that_cannot_run_are_disabled_with_the_reason():
    from lora_trainer.ui.fields import param_specs
    from lora_trainer.ui.widgets import disabled_options, field_widget

    import gradio as gr
    disabled = disabled_options({"xformers": "xformers is not installed", "bitsandbytes": "not installed"})
    with gr.Blocks():
        attention = field_widget(param_specs()["attention"], "a", disabled=disabled.get("attention"))
        adam = field_widget(param_specs()["use_8bit_adam"], "b", value=True, disabled=disabled.get("use_8bit_adam"))
    shown = [c[1] if isinstance(c, (tuple, list)) else c for c in attention.choices]
    assert "xformers" not in shown and "flash_attention" in shown
    assert "xformers unavailable: xformers is not installed" in attention.info
    assert adam.value is False and adam.interactive is False and "not installed" in adam.info


def test_after_a_job_the_users_lora_choice_stays_unless_the_job_made_one(ctl):
    from lora_trainer.config import ModelInfo
    from lora_trainer.progress import TrainResult
    from lora_trainer.ui.layout import _lists_after_job

    ctl.models.lora.mkdir(parents=True, exist_ok=True)
    for name in ("cat_1.safetensors", "cat_2.safetensors"):
        (ctl.models.lora / name).write_bytes(b"")
    info_path = ctl.models.model_dir("cat") / "model_info.json"
    info = ModelInfo.load(info_path)
    info.latest_lora = "cat_2.safetensors"
    info.save(info_path)
    finished = ctl.state()  # no job: nothing of its own to select
    kept = _lists_after_job(ctl, finished, "cat", "cat_1.safetensors")
    # Lists only: the page may have chosen again while the answer was on its way.
    assert "value" not in kept["lora"] and "value" not in kept["model"]
    assert kept["lora"]["choices"] == ["", "cat_1.safetensors", "cat_2.safetensors"] and "cat" in kept["model"]["choices"]
    assert _lists_after_job(ctl, finished, "cat", "gone.safetensors")["lora"]["value"] == "cat_2.safetensors"
    assert _lists_after_job(ctl, finished, "deleted", None)["model"]["value"] == "cat"
    finished.kind, finished.result = "train", TrainResult(ctl.models.lora / "cat_2.safetensors", 2, 1, 2)
    assert _lists_after_job(ctl, finished, "cat", "cat_1.safetensors")["lora"]["value"] == "cat_2.safetensors"


def test_a_job_that_ends_before_the_pages_first_poll_still_brings_its_lists_and_outcome(ctl):
    from lora_trainer.ui.layout import _poll, _seen_when_opened

    seen = _seen_when_opened(ctl)  # the page's load event
    assert ctl.create({"create.source": "tiny-sd1.safetensors", "create.name": "dog"}).startswith("Started")
    finish(ctl)  # done before the page first polls
    first = _poll(ctl, seen, "cat", "")
    assert first["model"]["value"] == "dog" and first["model"]["choices"] == ["cat", "dog"]
    assert first["message"].startswith("Create model 'dog' finished: wrote ")
    assert _poll(ctl, first["seen"], "dog", "") == {}


def test_generate_ckpt_options_reach_the_merge(ctl, tiny_sd1):
    """Lora Weight, Lora Text Weight, Merge Into and the format, as set in "Generate Ckpt Options"."""
    from helpers_merge import load_parts, random_lora, save_lora

    from lora_trainer.checkpoint_io import CheckpointReader

    unet, text = load_parts(ctl.models.model_dir("cat"))
    save_lora(ctl.models.lora / "cat_lora.safetensors", random_lora(unet, text))
    shutil.copy(tiny_sd1, ctl.models.checkpoints / "other.safetensors")
    shutil.copy(tiny_sd1.with_suffix(".yaml"), ctl.models.checkpoints / "other.yaml")
    named = {"model": "cat", "lora": "cat_lora.safetensors", "custom_model_name": "", "half": False,
             "subdir": False, "generate_ckpt.overwrite": False}
    ctl.generate_ckpt({**named, "into": "other.safetensors", "unet_weight": 0.5, "text_weight": 0.25,
                       "fmt": "safetensors"})
    state = finish(ctl)
    assert state.error is None, state.error
    with CheckpointReader(state.result) as reader:
        meta = reader.metadata
    assert (meta["lora_trainer_base"], meta["lora_trainer_unet_weight"], meta["lora_trainer_text_weight"]) == \
        ("other.safetensors", "0.5", "0.25")

    ctl.generate_ckpt({**named, "custom_model_name": "old", "into": "", "fmt": "ckpt"})
    state = finish(ctl)
    assert state.error is None, state.error
    assert state.result == ctl.models.checkpoints / "old_0_lora.ckpt" and state.result.is_file()
    assert "old_0_lora.ckpt" in ctl.source_choices()


def test_check_gpu_memory_counts_what_the_chosen_parameters_hold(ctl):
    import torch

    from lora_trainer.config import TrainingParams
    from lora_trainer.training.memory import describe, least_memory
    from lora_trainer.training.parts import part_dtypes
    from lora_trainer.ui.fields import named_from_params, param_specs, params_key

    keys = [params_key(n) for n in param_specs()]
    lora = TrainingParams(mixed_precision="fp16", rank=8)
    full = TrainingParams(use_lora=False, mixed_precision="no")
    folder = ctl.models.model_dir("cat")
    messages = {}
    for name, params in (("lora", lora), ("full", full)):
        messages[name] = ctl.check_memory({"model": "cat", **named_from_params(params, keys)})
        need = least_memory(folder, params, part_dtypes(params, torch.device("cuda")))
        if not torch.cuda.is_available():
            assert messages[name].startswith(f"{describe(need, None)} on a GPU; predicted peak ")
            assert messages[name].endswith("; no CUDA GPU here: training runs on the CPU")
    assert messages["lora"] != messages["full"]  # the widgets' values are what is counted
    assert ctl.check_memory({"model": ""}).startswith("Error: Model: choose a model")


def test_the_form_follows_the_chosen_model(ctl):
    """Each model's saved Parameters and Concepts; a model without any: defaults at its native resolution."""
    from lora_trainer.config import ModelInfo, TrainingParams
    from lora_trainer.ui.fields import named_from_params, param_specs, params_key

    keys = [params_key(n) for n in param_specs()] + ["custom_model_name"]
    concept_keys = list(concept_values())
    shutil.copytree(ctl.models.model_dir("cat"), ctl.models.model_dir("dog"))
    info_path = ctl.models.model_dir("dog") / "model_info.json"
    info = ModelInfo.load(info_path)
    info.model_name, info.resolution = "dog", 768
    info.save(info_path)
    cat = Concept(instance_data_dir="/pics/cat", instance_prompt="scs cat")
    ctl.save_params({"model": "cat", **named_from_params(TrainingParams(rank=8, custom_model_name="kitty"), keys),
                     **concept_values(cat)})

    message, values = ctl.settings_values("cat", keys + concept_keys)
    assert message == ""
    assert (values["params.rank"], values["custom_model_name"]) == (8, "kitty")
    assert values == {**named_from_params(TrainingParams(rank=8, custom_model_name="kitty"), keys),
                      **concept_values(cat)}
    message, values = ctl.settings_values("dog", keys + concept_keys)
    assert message == "" and values["params.resolution"] == 768
    assert values == {**named_from_params(TrainingParams(resolution=768), keys), **concept_values()}

    (ctl.models.model_dir("dog") / "params.json").write_text("{broken")
    message, values = ctl.settings_values("dog", keys)
    assert message.startswith("Error: ") and "params.json" in message


def test_a_quick_refusal_is_the_clicks_answer_and_a_late_one_ends_in_the_outcome(ctl):
    named = {"model": "cat", "lora": "", "subdir": False}
    ctl.generate_ckpt(named)
    finish(ctl)
    ctl.quick_seconds = 5.0
    message = ctl.generate_ckpt(named)  # the file exists: refused in the job, at once
    assert message.startswith("Generate ckpt of 'cat' failed: ") and "already exists" in message, message
    assert ctl.outcome(ctl.state()) == message
    assert ctl.answered_by_click(ctl.state())  # so the poll does not write it again over a later answer
    ctl.quick_seconds = 0
    assert not ctl.answered_by_click(ctl.state())
    assert ctl.cancel() == "No job is running."


def test_a_refused_training_never_asks_the_host_for_its_gpu(ctl, tmp_path):
    """A missing Dataset Directory is found before the job starts: the web UI keeps its checkpoint loaded."""
    concept = Concept(instance_data_dir=str(tmp_path / "missing"), instance_prompt="scs cat")
    message = ctl.train({"model": "cat", **concept_values(concept)})
    assert message.startswith("Error: ") and "missing" in message, message
    assert not ctl.runner.running and "release_gpu" not in ctl.host.calls


def test_generate_ckpt_says_when_the_lora_was_trained_on_another_model(ctl):
    from helpers_merge import load_parts, random_lora, save_lora

    unet, text = load_parts(ctl.models.model_dir("cat"))
    save_lora(ctl.models.lora / "dog_346.safetensors", random_lora(unet, text), {"lora_trainer_model": "dog"})
    save_lora(ctl.models.lora / "cat_2.safetensors", random_lora(unet, text), {"lora_trainer_model": "cat"})
    named = {"model": "cat", "subdir": False, "generate_ckpt.overwrite": True}
    ctl.generate_ckpt({**named, "lora": "dog_346.safetensors"})
    state = finish(ctl)
    assert state.error is None, state.error
    assert ctl.outcome(state).endswith("; LoRA dog_346 was trained on 'dog'; merged into 'cat'"), ctl.outcome(state)
    assert "LoRA dog_346 was trained on 'dog'; merged into 'cat'" in state.log
    ctl.generate_ckpt({**named, "lora": "cat_2.safetensors"})
    state = finish(ctl)
    assert state.error is None and "trained on" not in ctl.outcome(state)
