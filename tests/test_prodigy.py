"""Prodigy: it trains the tiny model, its step-size estimate resumes in the next run, the "Adaptive" preset
sets what its authors advise, and without the package the option is refused with the reason."""
from __future__ import annotations

import importlib.util

import pytest

from helpers_train import instance_pictures, private_models
from lora_trainer.config import Concept, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.lora import read_lora
from lora_trainer.presets import apply_preset
from lora_trainer.train import train
from lora_trainer.training import hardware
from lora_trainer.training.resume import RESUME_DIR, OPTIMIZER_FILE, load_optimizer_state

# CI's latest environment installs prodigyopt (.ci/envs/latest.txt); the a1111 and forge pins have none.
needs_prodigy = pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is None,
                                   reason="prodigyopt is not installed in this environment's pins")


@needs_prodigy
def test_prodigy_trains_the_tiny_model_and_resumes_its_estimate(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = apply_preset(TrainingParams(resolution=32, hflip=False, seed=0, max_train_steps=2,
                                         train_text_encoder=False), "Adaptive", cuda=False)
    assert params.optimizer == "Prodigy"
    first = train(models, "tiny", params, [concept], device="cpu")
    tensors, _ = read_lora(first.lora_path)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))
    saved = load_optimizer_state(models.model_dir("tiny") / RESUME_DIR / OPTIMIZER_FILE)
    group = saved["param_groups"][0]
    assert group["k"] == 2 and group["d_numerator"] != 0  # two Prodigy steps, its estimate under way
    second = train(models, "tiny", TrainingParams(**{**params.to_dict(), "max_train_steps": 1}), [concept],
                   device="cpu")
    assert second.lifetime_steps == first.lifetime_steps + 1
    again = load_optimizer_state(models.model_dir("tiny") / RESUME_DIR / OPTIMIZER_FILE)["param_groups"][0]
    assert again["k"] == 3 and again["d"] >= group["d"]  # continued from the saved estimate, not restarted


def test_adaptive_preset_is_prodigy_with_its_authors_settings():
    params = apply_preset(TrainingParams(use_8bit_adam=True), "Adaptive")
    assert (params.optimizer, params.use_8bit_adam, params.unet_learning_rate, params.text_encoder_learning_rate,
            params.weight_decay, params.prodigy_d_coef, params.prodigy_safeguard_warmup,
            params.prodigy_use_bias_correction) == ("Prodigy", False, 1.0, 1.0, 0.01, 1.0, True, True)
    assert TrainingParams().optimizer == "AdamW"


def test_prodigy_without_the_package_is_refused_with_the_reason(monkeypatch):
    reason = "prodigyopt is not installed (the Prodigy optimizer needs it)"
    monkeypatch.setattr("lora_trainer.optional.optional_features", lambda: {"prodigyopt": reason})
    with pytest.raises(ConfigError, match=r"Optimizer \('optimizer'\) Prodigy: prodigyopt is not installed"):
        hardware.check_optimizer(TrainingParams(optimizer="Prodigy"))
    with pytest.raises(ConfigError, match="untick Use 8bit Adam"):
        hardware.check_optimizer(TrainingParams(optimizer="Prodigy", use_8bit_adam=True))
