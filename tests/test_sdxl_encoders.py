"""SDXL's two text encoders, each with its own rank, alpha and learning rate; SDXL's validation loss."""
from __future__ import annotations

import contextlib
import csv
import json

import pytest
import torch
from helpers_data import BLUE, GREEN, RED, halves
from helpers_train import private_models
from safetensors import safe_open

from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.data import collect_examples
from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.families import family_named
from lora_trainer.train import check_before_loading, check_trains_something, train
from lora_trainer.training.adapters import attach_lora, trainable_groups
from lora_trainer.training.logs import CSV_FILE, LOGS_DIR
from lora_trainer.training.loop import TextCache
from lora_trainer.training.memory import least_memory
from lora_trainer.training.parts import load_working_model, part_dtypes
from lora_trainer.training.validation import build_validation_set, validation_loss

RES = 64
OWN = dict(text_encoder_rank=2, text_encoder_alpha=1.0, text_encoder_learning_rate=3e-3,
           text_encoder_2_rank=3, text_encoder_2_alpha=6.0, text_encoder_2_learning_rate=7e-3)


def _pictures(folder, count=2):
    colors = [RED, BLUE, GREEN]
    for i in range(count):
        halves(folder / f"p{i}.png", colors[i % 3], colors[(i + 1) % 3], size=(96, 48) if i % 2 else (48, 96))
        (folder / f"p{i}.txt").write_text(f"a zwx thing {i}", encoding="utf-8")
    return folder


def _loaded(created_xl):
    folder = created_xl.model_dir("xl")
    return load_working_model(folder, ModelInfo.load(folder / "model_info.json"))


def _file(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_a_two_step_run_saves_each_text_encoders_rank_and_alpha_and_logs_each_learning_rate(created_xl, tmp_path):
    models = private_models(created_xl, tmp_path / "models", "xl")
    concept = Concept(instance_data_dir=str(_pictures(tmp_path / "pictures")), instance_prompt="[filewords]")
    params = TrainingParams(max_train_steps=2, resolution=RES, use_buckets=True, seed=2, rank=4, lora_alpha=4.0,
                            unet_learning_rate=1e-2, **OWN)
    result = train(models, "xl", params, [concept], device="cpu")
    tensors, meta = _file(result.lora_path)

    def ranks_and_alphas(prefix):
        downs = {k: v for k, v in tensors.items() if k.startswith(prefix) and k.endswith(".lora_down.weight")}
        alphas = {float(tensors[k.replace(".lora_down.weight", ".alpha")]) for k in downs}
        return {v.shape[0] for v in downs.values()}, alphas

    assert ranks_and_alphas("lora_unet_") == ({4}, {4.0})
    assert ranks_and_alphas("lora_te1_") == ({2}, {1.0})   # the first encoder keeps its own
    assert ranks_and_alphas("lora_te2_") == ({3}, {6.0})
    assert json.loads(meta["ss_network_args"]) == {"text_encoder_dim": "2", "text_encoder_alpha": "1.0",
                                                   "text_encoder_2_dim": "3", "text_encoder_2_alpha": "6.0"}
    assert meta["ss_text_encoder_lr"] == "[0.003, 0.007]"  # kohya's SDXL scripts write the list
    rows = list(csv.DictReader(next((models.model_dir("xl") / LOGS_DIR).glob(f"*/{CSV_FILE}")).open()))
    assert [(float(r["lr_unet"]), float(r["lr_text_encoder"]), float(r["lr_text_encoder_2"])) for r in rows] == \
        [(1e-2, 3e-3, 7e-3)] * 2

    # A later run must use the same shapes: the second encoder's rank is checked by its own name, before loading.
    changed = TrainingParams(**{**params.to_dict(), "text_encoder_2_rank": 5})
    with pytest.raises(ModelError, match=r"Lora Text Encoder 2 Rank \('text_encoder_2_rank'\) is 5, the model was "
                                         r"trained with 3"):
        check_before_loading(models, "xl", changed, [concept], "cpu")
    same_as_first = TrainingParams(**{**params.to_dict(), "text_encoder_2_alpha": 0.0})
    with pytest.raises(ModelError, match=r"\('text_encoder_2_alpha'\) is 0 \(the first text encoder's: 1\), the "
                                         r"model was trained with 6"):
        check_before_loading(models, "xl", same_as_first, [concept], "cpu")
    check_before_loading(models, "xl", params, [concept], "cpu")  # the same settings continue


def test_zero_means_the_first_encoders_value_and_one_encoder_families_ignore_the_second(created_xl, created_sd1):
    model = _loaded(created_xl)
    params = TrainingParams(text_encoder_rank=2, text_encoder_alpha=1.0, text_encoder_learning_rate=3e-3)
    assert params.text_encoder_lora(1) == params.text_encoder_lora(0) == (2, 1.0, 3e-3)
    adapters = attach_lora(model, TrainingParams(**{**params.to_dict(), "text_encoder_2_learning_rate": 7e-3}))
    groups = trainable_groups(model, adapters, TrainingParams(**{**params.to_dict(), "text_encoder_2_learning_rate": 7e-3}))
    assert [g["lr"] for g in groups] == [1e-4, 3e-3, 7e-3]
    assert [len(g["params"]) for g in groups[1:]] == [2 * len(a) for a in adapters.text_encoders]
    assert {a.lora_down.weight.shape[0] for a in adapters.text_encoders[1].values()} == {2}

    folder = created_sd1.model_dir("tiny")
    sd1 = load_working_model(folder, ModelInfo.load(folder / "model_info.json"))
    one = attach_lora(sd1, TrainingParams(**{**OWN}))
    assert len(one.text_encoders) == 1
    assert {a.lora_down.weight.shape[0] for a in one.text_encoders[0].values()} == {2}
    assert [g["lr"] for g in trainable_groups(sd1, one, TrainingParams(**OWN))] == [1e-4, 3e-3]


def test_the_second_encoders_learning_rate_alone_is_something_to_train_for_sdxl_only():
    only_second = TrainingParams(unet_learning_rate=0.0, text_encoder_learning_rate=0.0,
                                 text_encoder_2_learning_rate=1e-4)
    check_trains_something(only_second, family_named("sdxl"))
    with pytest.raises(ConfigError, match="Lora Text Encoder Learning Rate"):
        check_trains_something(only_second, family_named("sd1"))


def test_the_memory_count_uses_each_encoders_rank(created_xl):
    folder = created_xl.model_dir("xl")
    params = TrainingParams(**OWN)
    dtypes = part_dtypes(params, torch.device("cpu"), family_named("sdxl"))
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"), dtypes)
    values = sum(p.numel() for g in trainable_groups(model, attach_lora(model, params), params) for p in g["params"])
    assert least_memory(folder, params, dtypes).training == 16 * values  # value + gradient + two moments, fp32


def test_sdxl_validation_loss_is_the_same_twice_and_not_the_training_pictures_loss(created_xl, tmp_path):
    model = _loaded(created_xl)
    adapters = attach_lora(model, TrainingParams(train_text_encoder=False))
    torch.manual_seed(3)
    for adapter in adapters.all.values():
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.05)
    concept = Concept(instance_data_dir=str(_pictures(tmp_path / "pictures", count=3)), instance_prompt="[filewords]")
    instance, _ = collect_examples([concept], tmp_path)
    held, trained = instance[:1], instance[1:]
    cpu = torch.device("cpu")

    def measure(examples, text_cache=None):
        vset = build_validation_set(examples, model, resolution=RES, center_crop=True, device=cpu)
        assert vset.conditioning["time_ids"].shape == (len(examples), 6)  # SDXL's size/crop ids are there
        torch.manual_seed(int(torch.randint(0, 1000, ())))  # whatever the global state: the same inputs
        return validation_loss(vset, model.unet, model.text_encoders, model.noise_scheduler, family=model.info.family,
                               device=cpu, autocast=contextlib.nullcontext, text_cache=text_cache)

    first, second = measure(held), measure(held)
    assert first == second and first > 0
    assert measure(trained) != first
    # "Cache Text Encoder Outputs": the same encodings looked up by prompt give the same loss.
    from lora_trainer.data import DreamBoothDataset

    cache = TextCache()
    data = DreamBoothDataset(held, [], resolution=RES, center_crop=True, hflip=False, tokenizer=model.tokenizer,
                             tokenizer_2=model.tokenizer_2, time_ids=True)
    cache.fill(model.info.family, model.text_encoders, data, [e.prompt for e in held], cpu)
    assert measure(held, cache) == pytest.approx(first, rel=1e-6)
    with torch.no_grad():
        next(iter(adapters.unet.values())).lora_up.weight.mul_(3.0)
    assert measure(held) != first  # a different LoRA does change it


def test_an_sdxl_run_with_cached_text_encoder_outputs_measures_the_validation_loss(created_xl, tmp_path):
    models = private_models(created_xl, tmp_path / "models", "xl")
    concept = Concept(instance_data_dir=str(_pictures(tmp_path / "pictures", count=3)), instance_prompt="[filewords]")
    params = TrainingParams(max_train_steps=2, resolution=RES, seed=1, train_text_encoder=False,
                            cache_text_encoder_outputs=True, validation_split=0.34, validation_every_n_steps=1,
                            unet_learning_rate=1e-2)
    result = train(models, "xl", params, [concept], device="cpu")
    assert [s for s, _ in result.val_losses] == [1, 2]
    assert all(v > 0 for _, v in result.val_losses) and result.best_step in (1, 2)


def test_the_second_encoders_fields_have_flags_and_sit_beside_the_first_encoders_in_the_tab(created_xl, tmp_path):
    from lora_trainer.cli import build_parser
    from lora_trainer.cli.train import params_from_args
    from lora_trainer.ui.fields import param_specs

    args = build_parser().parse_args(["train", "--models-dir", str(tmp_path), "--model", "xl", "--text_encoder_2_rank",
                                      "8", "--text_encoder_2_alpha", "2", "--text_encoder_2_learning_rate", "1e-5"])
    params = params_from_args(args, created_xl.model_dir("xl"))
    assert params.text_encoder_lora(1) == (8, 2.0, 1e-5) and params.text_encoder_lora(0) == (4, 4.0, 5e-5)
    names = list(param_specs())
    for first in ("text_encoder_rank", "text_encoder_alpha", "text_encoder_learning_rate"):
        second = first.replace("text_encoder_", "text_encoder_2_")
        assert names.index(second) == names.index(first) + 1
        assert param_specs()[second].advanced == param_specs()[first].advanced  # same section of the tab
        assert "SDXL" in param_specs()[second].help and "0 = the " in param_specs()[second].help


def test_the_tab_shows_the_second_encoders_fields_for_sdxl_models_only(created_xl, created_sd1):
    from helpers_hosts import RecordingHost

    from lora_trainer.ui.controller import Controller

    shown = Controller(RecordingHost(created_xl)).shown_params("xl")
    assert shown == {"params.text_encoder_2_rank": True, "params.text_encoder_2_alpha": True,
                     "params.text_encoder_2_learning_rate": True}
    assert set(Controller(RecordingHost(created_sd1)).shown_params("tiny").values()) == {False}
    assert set(Controller(RecordingHost(created_sd1)).shown_params("").values()) == {True}  # no model chosen yet


def test_the_sdxl_option_table_in_the_docs_decides_every_field():
    import dataclasses
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "families.md").read_text(encoding="utf-8")
    table = text.split("### SDXL, option by option", 1)[1].split("\n\n`tests/", 1)[0]
    named = set(re.findall(r"`([a-z0-9_]+)`", table))
    prefixes = re.findall(r"`([a-z0-9_]+)\*`", table)  # `prodigy_*`: every field with that prefix
    fields = {f.name for cls in (TrainingParams, Concept) for f in dataclasses.fields(cls)}
    undecided = {name for name in fields - named if not any(name.startswith(p) for p in prefixes)}
    assert undecided == set(), f"decide these options for SDXL in docs/families.md: {sorted(undecided)}"


def test_fp8_base_weights_cover_the_second_text_encoder_and_the_count_says_so(created_xl):
    from lora_trainer.training.parts import store_base_in_fp8

    params = TrainingParams(base_weights="fp8")
    folder = created_xl.model_dir("xl")
    dtypes = part_dtypes(params, torch.device("cpu"), family_named("sdxl"))
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"), dtypes)
    store_base_in_fp8(model, dtypes, torch.device("cpu"))
    assert any(name.endswith("weight_fp8") for name, _ in model.text_encoder_2.named_buffers())
    held = sum(t.numel() * t.element_size() for part in (model.unet, model.vae, *model.text_encoders)
               for t in part.state_dict().values())
    assert least_memory(folder, params, dtypes).weights == held
