"""Validation loss: held-out pictures are never trained on, the loss is the same number for the same LoRA
(fixed noise and timesteps, whatever the global random state), the run measures it, plots it beside the
training loss, writes it to the CSV and names the best step and its LoRA."""
from __future__ import annotations

import contextlib
import csv

import numpy as np
import pytest
import torch
from helpers_data import BLUE, GREEN, RED, halves, solid
from helpers_train import private_models

from lora_trainer import train as train_module
from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.data import collect_examples
from lora_trainer.errors import ConfigError
from lora_trainer.train import train
from lora_trainer.training.adapters import attach_lora
from lora_trainer.training.logs import CSV_FILE, LOGS_DIR
from lora_trainer.training.parts import load_working_model
from lora_trainer.training.validation import build_validation_set, hold_out, validation_loss
from lora_trainer.ui import render

RES = 32


def _pictures(folder, count=6):
    colors = [RED, BLUE, GREEN]
    for i in range(count):
        halves(folder / f"p{i}.png", colors[i % 3], colors[(i + 1) % 3], size=(32, 32))
        (folder / f"p{i}.txt").write_text(f"scs thing {i}", encoding="utf-8")
    return folder


def test_held_out_pictures_are_not_trained_on_and_always_the_same(tmp_path):
    folder = _pictures(tmp_path / "pictures")
    concept = Concept(instance_data_dir=str(folder), instance_prompt="[filewords]")
    instance, _ = collect_examples([concept], tmp_path)
    train_part, held = hold_out(instance, [concept], tmp_path, 0.34)
    assert len(held) == 2 and len(train_part) == 4
    assert not {e.image_path for e in held} & {e.image_path for e in train_part}
    again = hold_out(instance, [concept], tmp_path, 0.34)[1]
    assert [e.image_path for e in again] == [e.image_path for e in held]
    assert hold_out(instance, [concept], tmp_path, 0.0) == (instance, [])

    other = _pictures(tmp_path / "validate", count=2)
    named = Concept(instance_data_dir=str(folder), instance_prompt="[filewords]", validation_data_dir=str(other))
    train_part, held = hold_out(instance, [named], tmp_path, 0.34)
    assert len(train_part) == 6 and {e.image_path.parent for e in held} == {other}
    with pytest.raises(ConfigError, match="Validation Directory \\('validation_data_dir'\\)"):
        hold_out(instance, [Concept(instance_data_dir=str(folder), validation_data_dir=str(tmp_path / "no"))],
                 tmp_path, 0.0)


def test_the_same_lora_gives_the_same_validation_loss_twice(created_sd1, tmp_path):
    folder = _pictures(tmp_path / "pictures", count=3)
    model_dir = created_sd1.model_dir("tiny")
    model = load_working_model(model_dir, ModelInfo.load(model_dir / "model_info.json"))
    adapters = attach_lora(model, TrainingParams(resolution=RES, train_text_encoder=False))
    torch.manual_seed(3)
    for adapter in adapters.all.values():
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.05)
    instance, _ = collect_examples([Concept(instance_data_dir=str(folder), instance_prompt="[filewords]")], tmp_path)

    def measure():
        vset = build_validation_set(instance, model, resolution=RES, center_crop=True, device=torch.device("cpu"))
        torch.manual_seed(int(torch.randint(0, 1000, ())))  # whatever the global state: the same inputs
        return validation_loss(vset, model.unet, model.text_encoders, model.noise_scheduler, family=model.info.family,
                               device=torch.device("cpu"), autocast=contextlib.nullcontext)

    first, second = measure(), measure()
    assert first == second and first > 0
    with torch.no_grad():
        next(iter(adapters.all.values())).lora_up.weight.mul_(3.0)
    assert measure() != first  # a different LoRA does change it


def test_run_measures_plots_and_names_the_best_step(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    folder = _pictures(tmp_path / "pictures", count=4)
    concept = Concept(instance_data_dir=str(folder), instance_prompt="[filewords]")
    params = TrainingParams(max_train_steps=4, resolution=RES, hflip=False, seed=0, unet_learning_rate=5e-2,
                            train_text_encoder=False, validation_split=0.25, validation_every_n_steps=1,
                            save_every_n_steps=2)
    seen, reports = {}, []
    real_loop = train_module.run_loop

    def watch(loop, display):
        seen["trained"] = {e.image_path for e in loop.dataset.instance}
        return real_loop(loop, display)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "run_loop", watch)
        result = train(models, "tiny", params, [concept], report=reports.append, device="cpu")
    instance, _ = collect_examples([concept], tmp_path)
    held = {e.image_path for e in hold_out(instance, [concept], tmp_path, 0.25)[1]}
    assert len(held) == 1 and not held & seen["trained"] and len(seen["trained"]) == 3
    assert [s for s, _ in result.val_losses] == [1, 2, 3, 4]
    assert [(r.step, r.val_loss) for r in reports if r.val_loss is not None] == result.val_losses
    saved = {s: v for s, v in result.val_losses if s in (2, 4)}
    assert result.best_step == min(saved, key=saved.get)  # among the saved steps: its LoRA is kept
    assert result.best_lora is not None and result.best_lora.is_file()
    assert result.best_lora.name == f"tiny_{result.best_step}.safetensors"
    rows = list(csv.DictReader(next((models.model_dir("tiny") / LOGS_DIR).glob(f"*/{CSV_FILE}")).open()))
    assert [float(r["val_loss"]) for r in rows] == [v for _, v in result.val_losses]
    plain = render.loss_plot(list(enumerate(result.losses, 1)))
    plotted = render.loss_plot(list(enumerate(result.losses, 1)), result.val_losses)
    def blue(image):
        return int((np.asarray(image) == (37, 99, 235)).all(axis=-1).sum())
    assert blue(plotted) > 0 and blue(plain) == 0
