"""Exact resume: a run cancelled and started again ends where a run that never stopped ends."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
from helpers_data import BLUE, GREEN, RED, halves, solid
from helpers_train import instance_pictures, private_models

from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.lora import read_lora
from lora_trainer.train import train

# 5 pictures, batch 1, accumulation 2: 3 steps an epoch (2 + 2 + 1 batches), so step 10 stops in the middle
# of an epoch and of an accumulation cycle; a cosine schedule with warmup moves the learning rate every step;
# flips and cached latents draw from the generators every epoch and step.
PARAMS = dict(max_train_steps=20, train_batch_size=1, gradient_accumulation_steps=2, lr_scheduler="cosine",
              lr_warmup_steps=3, unet_learning_rate=2e-2, text_encoder_learning_rate=1e-2, resolution=32,
              hflip=True, seed=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    pictures = instance_pictures(root / "pictures")
    halves(pictures / "d.png", GREEN, RED, size=(32, 40))
    solid(pictures / "e.png", BLUE, size=(32, 32))
    return Concept(instance_data_dir=str(pictures), instance_prompt="scs thing")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _train(models, concept, cancel_at=None, *, model="tiny", base=PARAMS, **changes):
    cancel, lines = threading.Event(), _Lines()

    def report(progress):
        if cancel_at and progress.job == "train" and progress.step == cancel_at and progress.loss is not None:
            cancel.set()

    logger = logging.getLogger("lora_trainer")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        result = train(models, model, TrainingParams(**{**base, **changes}), [concept], report=report,
                       cancel=cancel, device="cpu")
    finally:
        logger.removeHandler(lines)
    return result, lines.lines


def test_ten_plus_ten_steps_equal_twenty(created_sd1, tmp_path, data, reliability):
    whole = private_models(created_sd1, tmp_path / "whole")
    uninterrupted, _ = _train(whole, data)
    assert uninterrupted.steps == 20 and not uninterrupted.cancelled

    halves_ = private_models(created_sd1, tmp_path / "halves")
    first, _ = _train(halves_, data, cancel_at=10)
    assert first.cancelled and first.steps == 10 and first.lifetime_steps == 10
    second, lines = _train(halves_, data)
    assert "Resuming the interrupted run at step 11 of 20" in lines, lines
    assert (second.steps, second.lifetime_steps, second.revision, second.cancelled) == (10, 20, 1, False)
    assert second.lora_path.name == uninterrupted.lora_path.name == "tiny_20.safetensors"

    assert second.losses == pytest.approx(uninterrupted.losses[10:], rel=1e-6, abs=1e-7)
    expected, _ = read_lora(uninterrupted.lora_path)
    got, _ = read_lora(second.lora_path)
    assert expected.keys() == got.keys()
    worst = max(float((expected[k].float() - got[k].float()).abs().max()) for k in expected)
    assert worst <= 1e-6, worst
    changed = max(float(expected[k].float().abs().max()) for k in expected if k.endswith("lora_up.weight"))
    assert changed > 1e-3  # the adapters did learn: the comparison is not of two untouched zero matrices
    info = ModelInfo.load(halves_.model_dir("tiny") / "model_info.json")
    assert (info.lifetime_steps, info.revision, info.latest_lora) == (20, 1, "tiny_20.safetensors")
    loss_gap = max(abs(a - b) for a, b in zip(second.losses, uninterrupted.losses[10:]))
    reliability("Cancel at step 10 of 20 (mid-epoch, mid-accumulation, cosine warmup schedule, flips), "
                "then the same run started again",
                f"'{next(line for line in lines if line.startswith('Resuming'))}'; LoRA tensors differ from an "
                f"uninterrupted run by at most {worst:.1e}, losses of steps 11-20 by at most {loss_gap:.1e}")


def test_finished_run_or_new_run_flag_starts_a_new_run(created_sd1, tmp_path, data):
    models = private_models(created_sd1, tmp_path / "models")
    short = dict(max_train_steps=3, gradient_accumulation_steps=1)
    first, _ = _train(models, data, cancel_at=1, **short)
    assert first.steps == 1
    second, lines = _train(models, data, new_run=True, **short)
    assert not any("Resuming" in line for line in lines)
    assert any("stopped at step 1 of 3" in line and "Start a New Run ('new_run')" in line for line in lines), lines
    assert (second.steps, second.lifetime_steps) == (3, 4)
    third, lines = _train(models, data, **short)  # the last run finished: a new one
    assert not any("Resuming" in line for line in lines) and (third.steps, third.lifetime_steps) == (3, 7)
    saved = TrainingParams.load(models.model_dir("tiny") / "params.json")
    assert not saved.new_run  # asked for once, not kept for the next start


# SDXL: 3 pictures of two shapes in buckets, accumulation 2 (2 steps an epoch: 2 + 1 batches), so step 2 stops at
# an epoch's end and mid-way through none; 4 steps keep the tiny SDXL model quick. The time ids, pooled embedding
# and (with the 8 GB GPU (SDXL) preset's Cache Text Encoder Outputs) the text cache all take part.
SDXL_PARAMS = dict(PARAMS, max_train_steps=4, resolution=64, use_buckets=True, seed=5)


@pytest.mark.one_env  # six short SDXL runs; what they check does not depend on the host's pins
@pytest.mark.parametrize("changes", [
    pytest.param(dict(train_text_encoder=False, cache_text_encoder_outputs=True), id="cached-text-encoder-outputs"),
    pytest.param(dict(text_encoder_2_rank=2, text_encoder_2_learning_rate=5e-3), id="both-text-encoders-trained"),
])
def test_an_sdxl_run_stopped_and_started_again_equals_the_uninterrupted_run(created_xl, tmp_path, changes):
    pictures = tmp_path / "pictures"
    halves(pictures / "wide.png", RED, BLUE, size=(96, 48))
    halves(pictures / "tall.png", BLUE, RED, size=(48, 96))
    solid(pictures / "square.png", GREEN, size=(64, 64))
    concept = Concept(instance_data_dir=str(pictures), instance_prompt="zwx thing")
    run = dict(model="xl", base=SDXL_PARAMS, **changes)
    uninterrupted, _ = _train(private_models(created_xl, tmp_path / "whole", "xl"), concept, **run)
    halves_ = private_models(created_xl, tmp_path / "halves", "xl")
    first, _ = _train(halves_, concept, cancel_at=2, **run)
    assert first.cancelled and first.steps == 2
    second, lines = _train(halves_, concept, **run)
    assert "Resuming the interrupted run at step 3 of 4" in lines, lines
    assert second.lora_path.name == uninterrupted.lora_path.name == "xl_4.safetensors"
    assert second.losses == pytest.approx(uninterrupted.losses[2:], rel=1e-6, abs=1e-7)
    expected, _ = read_lora(uninterrupted.lora_path)
    got, _ = read_lora(second.lora_path)
    assert expected.keys() == got.keys()
    assert any(k.startswith("lora_te2_") for k in got) != changes.get("cache_text_encoder_outputs", False)
    worst = max(float((expected[k].float() - got[k].float()).abs().max()) for k in expected)
    assert worst <= 1e-6, worst
    assert max(float(expected[k].float().abs().max()) for k in expected if k.endswith("lora_up.weight")) > 1e-3
