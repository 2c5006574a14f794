"""EMA of the trained weights: the saved LoRA (and the previews) hold the average of the weights after each step
(checked against a hand computation after three steps), the resume state keeps the raw weights and
the averages, and the next run continues the averages."""
from __future__ import annotations

import pytest
import torch
from helpers_train import instance_pictures, private_models
from safetensors.torch import load_file

from lora_trainer import train as train_module
from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.lora import load_lora_state_dict, read_lora
from lora_trainer.train import train
from lora_trainer.training.adapters import attach_lora, trainable_groups
from lora_trainer.training.parts import load_working_model
from lora_trainer.training.resume import ADAPTERS_FILE, EMA_FILE, RESUME_DIR

DECAY = 0.5
PARAMS = dict(resolution=32, hflip=False, seed=0, train_batch_size=1, unet_learning_rate=5e-2,
              text_encoder_learning_rate=2e-2, use_ema=True, ema_decay=DECAY)


def _watched_train(models, params, concept, patch_more=None):
    """Train (with `patch_more(patch, seen)` applied first), recording the trained weights before the first
    step and after every step (raw, in memory)."""
    seen = {"weights": [], "start_ema": None}
    real_loop = train_module.run_loop

    def watch(loop, display):
        seen["loop"] = loop
        seen["weights"].append([p.detach().clone() for p in loop.trainable])
        seen["start_ema"] = [a.clone() for a in loop.ema.averages]
        on_step = loop.on_step

        def record(step, epochs):
            seen["weights"].append([p.detach().clone() for p in loop.trainable])
            on_step(step, epochs)
        loop.on_step = record
        return real_loop(loop, display)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "run_loop", watch)
        if patch_more is not None:
            patch_more(patch, seen)
        result = train(models, "tiny", params, [concept], device="cpu")
    return result, seen


def _recording_samples(drawn: list):
    """A `patch_more` that records the trained weights as the previews would be drawn with them (drawing nothing)."""
    def patch_more(patch, seen):
        patch.setattr(train_module, "draw_samples",
                      lambda *a, **k: drawn.append([p.detach().clone() for p in seen["loop"].trainable]) or [])
    return patch_more


def _saved_weights(models, params, path):
    """The tensors of a LoRA file, in the order of the run's trainable parameters."""
    folder = models.model_dir("tiny")
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"))
    adapters = attach_lora(model, params)
    load_lora_state_dict(adapters.all, read_lora(path)[0], source=str(path))
    return [p.detach().clone() for g in trainable_groups(model, adapters, params) for p in g["params"]]


def test_saved_lora_is_the_hand_computed_ema_after_three_steps_and_resumes(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(max_train_steps=3, save_preview_every_n_steps=3, **PARAMS)
    drawn = []
    result, seen = _watched_train(models, params, concept, _recording_samples(drawn))
    w0, w1, w2, w3 = seen["weights"]
    hand = [DECAY * (DECAY * (DECAY * a + (1 - DECAY) * b) + (1 - DECAY) * c) + (1 - DECAY) * d
            for a, b, c, d in zip(w0, w1, w2, w3)]
    assert len(drawn) == 1  # the previews of step 3 are drawn with the averages too
    for got, want in zip(drawn[0], hand):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    saved = _saved_weights(models, params, result.lora_path)
    assert len(saved) == len(hand) > 0
    for got, want in zip(saved, hand):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(saved, w3))  # the EMA, not the last weights
    resume = models.model_dir("tiny") / RESUME_DIR
    raw = load_file(str(resume / ADAPTERS_FILE))
    assert any(torch.equal(v, w3[0]) for v in raw.values())  # training goes on from the raw weights
    assert (resume / EMA_FILE).is_file()

    _, again = _watched_train(models, TrainingParams(max_train_steps=1, **PARAMS), concept)
    for got, want in zip(again["start_ema"], hand):  # the next run continues the averages
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_decay_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainingParams(use_ema=True, ema_decay=1.5)


def test_a_full_finetune_samples_and_saves_the_ema_and_trains_on_with_the_raw_weights(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(use_lora=False, max_train_steps=2, learning_rate=1e-3, train_text_encoder=False,
                            save_preview_every_n_steps=2, **{**PARAMS, "use_ema": True})
    drawn = []
    result, seen = _watched_train(models, params, concept, _recording_samples(drawn))
    w0, w1, w2 = seen["weights"]
    hand = [DECAY * (DECAY * a + (1 - DECAY) * b) + (1 - DECAY) * c for a, b, c in zip(w0, w1, w2)]
    assert result.lora_path is None and len(drawn) == 1
    for got, want in zip(drawn[0], hand):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(w2, hand))  # the raw weights differ from the average
    assert all(torch.equal(a, b) for a, b in zip(w2, seen["loop"].trainable))  # and are back after the save
    folder = models.model_dir("tiny")
    saved = list(load_working_model(folder, ModelInfo.load(folder / "model_info.json")).unet.parameters())
    assert len(saved) == len(hand) > 0
    for got, want in zip(saved, hand):  # the model written is the average
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

