"""The GPU memory a run needs before activations, counted from file headers: exact against the loaded
model and its adapters, and a run that cannot fit is refused before anything is loaded."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers_train import instance_pictures, private_models

from lora_trainer import train as train_module
from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.lora import lora_parameters
from lora_trainer.training.adapters import attach_lora
from lora_trainer.training.memory import GB, MemoryNeed, check_memory, least_memory
from lora_trainer.training.parts import load_working_model, part_dtypes

GPU = torch.device("cuda")  # only its type is looked at: the dtypes a GPU run uses


def _loaded(created_sd1, dtypes):
    folder = created_sd1.model_dir("tiny")
    return folder, load_working_model(folder, ModelInfo.load(folder / "model_info.json"), dtypes)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _state(n: int, options: dict) -> int:
    """The optimizer's and EMA's bytes of a trained fp32 tensor of n values, by each library's rule."""
    if options.get("optimizer") == "Prodigy":
        state = 4 * 4 * n                                   # s, p0, exp_avg, exp_avg_sq
    elif options.get("use_8bit_adam") and n >= 4096:
        state = 2 * n + 2 * 4 * math.ceil(n / 256)          # uint8 moments + an fp32 absmax per 256-value block
    else:
        state = 2 * 4 * n                                   # AdamW's two fp32 moments
    return state + (4 * n if options.get("use_ema") else 0)  # the EMA's fp32 copy


@pytest.mark.parametrize("options", [{}, {"use_8bit_adam": True}, {"optimizer": "Prodigy"}, {"use_ema": True},
                                     {"conv_rank": 4}, {"use_dora": True}, {"conv_rank": 2, "use_dora": True}],
                         ids=["adamw", "8bit", "prodigy", "ema", "locon", "dora", "locon-dora"])
def test_lora_need_equals_the_loaded_weights_and_the_adapters_state(created_sd1, options):
    params = TrainingParams(mixed_precision="fp16", rank=64, text_encoder_rank=8, **options)
    dtypes = part_dtypes(params, GPU)
    folder, model = _loaded(created_sd1, dtypes)
    need = least_memory(folder, params, dtypes)
    assert need.weights == _bytes(model.unet) + _bytes(model.text_encoder) + _bytes(model.vae)
    adapters = attach_lora(model, params)
    values = [p.numel() for p in lora_parameters({**adapters.unet, **adapters.text})]
    assert need.training == sum(8 * n + _state(n, options) for n in values)  # value + gradient (fp32) + state
    assert any(n >= 4096 for n in values) and any(n < 4096 for n in values)  # both kinds of 8-bit moments counted


def test_full_finetune_need_counts_gradients_and_moments_of_the_whole_parts(created_sd1):
    params = TrainingParams(use_lora=False, train_text_encoder=True, mixed_precision="fp16")
    dtypes = part_dtypes(params, GPU)
    assert (dtypes["unet"], dtypes["text_encoder"], dtypes["vae"]) == (torch.float32, torch.float32, torch.float16)
    folder, model = _loaded(created_sd1, dtypes)
    need = least_memory(folder, params, dtypes)
    trained = sum(p.numel() for part in (model.unet, model.text_encoder) for p in part.parameters())
    assert need.training == 12 * trained  # fp32 gradient + two fp32 moments; the weights are counted already
    without_text = least_memory(folder, dataclasses.replace(params, train_text_encoder=False), dtypes)
    assert without_text.training == 12 * sum(p.numel() for p in model.unet.parameters())


def test_a_run_that_cannot_fit_is_refused_naming_the_figures_and_the_options():
    need = MemoryNeed(weights=2 * GB, training=int(0.5 * GB))
    check_memory(need, None, "CPU")                  # not a GPU: nothing to check
    check_memory(need, 3 * GB, "RTX 3070")
    with pytest.raises(ConfigError) as refused:
        check_memory(need, 2 * GB, "RTX 3070")
    message = str(refused.value)
    assert "\n" not in message
    assert all(part in message for part in ("2.5 GB", "RTX 3070 has 2.0 GB free", "Use LORA", "Use 8bit Adam",
                                            "Train Text Encoder")), message


def test_refused_on_a_full_gpu_before_anything_is_loaded(created_sd1, tmp_path, monkeypatch):
    """mem_get_info cannot run here: the free memory is what a nearly full GPU would report."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded weights before checking the memory")

    monkeypatch.setattr(train_module, "free_gpu_memory", lambda device: 1 << 20)
    monkeypatch.setattr(train_module, "load_working_model", must_not_run)
    monkeypatch.setattr(train_module, "generate_class_images", must_not_run)
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs",
                      class_prompt="thing", num_class_images=2)
    with pytest.raises(ConfigError, match="GPU memory: this run needs at least"):
        train_module.train(models, "tiny", TrainingParams(), [concept], device="cpu")
    assert not (models.model_dir("tiny") / "params.json").exists()
