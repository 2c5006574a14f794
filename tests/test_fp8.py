"""Base Weight Storage fp8: frozen layers kept as float8 e4m3 with a scale, cast per layer; the "4 GB card" preset."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers_train import instance_pictures, private_models
from torch import nn

from lora_trainer import fp8
from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.fp8 import Fp8Conv2d, Fp8Linear, store_in_fp8
from lora_trainer.presets import apply_preset
from lora_trainer.train import train
from lora_trainer.training.hardware import check_options, probe_hardware
from lora_trainer.training.memory import least_memory
from lora_trainer.training.parts import load_working_model, part_dtypes, store_base_in_fp8


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(16 * 36, 32)).requires_grad_(False)


@pytest.mark.parametrize("autocast", [False, True])
def test_fp8_layers_compute_like_the_base_and_keep_one_byte_per_weight(autocast):
    base = _layers()
    stored = copy.deepcopy(base)
    assert store_in_fp8(stored, torch.float32) == 2
    assert isinstance(stored[0], Fp8Conv2d) and isinstance(stored[3], Fp8Linear)
    assert stored[0].weight_fp8.dtype == stored[3].weight_fp8.dtype == torch.float8_e4m3fn
    assert not any(p.numel() > 32 for p in stored.parameters())  # only the biases are left as parameters
    x = torch.randn(3, 4, 6, 6)
    outputs, grads = [], []
    for model in (base, stored):
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(inputs)
        out.float().square().sum().backward()
        outputs.append(out.float())
        grads.append(inputs.grad)
    # e4m3 keeps 3 mantissa bits: each weight within 6.25 %, the sums over many of them closer.
    for ours, reference in zip((outputs[1], grads[1]), (outputs[0], grads[0])):
        assert (ours - reference).abs().max() <= 0.08 * reference.abs().max()
    assert outputs[1].dtype == torch.float32 and (outputs[1] != outputs[0]).any()  # really computed from float8
    # The exact meaning: the layer computes with values * scale.
    linear = stored[3]
    features = torch.randn(2, 16 * 36)
    expected = features @ (linear.weight_fp8.float() * linear.weight_scale).T + linear.bias
    assert torch.allclose(linear(features), expected, atol=1e-5)


def test_fp8_refuses_weights_that_train():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="only frozen weights"):
        store_in_fp8(nn.Sequential(layer), torch.float32)


def test_memory_counts_one_byte_per_fp8_weight(created_sd1):
    params = TrainingParams(base_weights="fp8", rank=4)
    folder = created_sd1.model_dir("tiny")
    dtypes = part_dtypes(params, torch.device("cpu"))
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"), dtypes)
    store_base_in_fp8(model, dtypes, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for part in (model.unet, model.text_encoder, model.vae)
               for t in part.state_dict().values())
    assert least_memory(folder, params, dtypes).weights == held
    plain = least_memory(folder, dataclasses.replace(params, base_weights="default"), dtypes).weights
    stored = [b for part in (model.unet, model.text_encoder) for name, b in part.named_buffers() if name.endswith("weight_fp8")]
    assert len(stored) > 50 and plain - held == sum(3 * b.numel() - 4 for b in stored)  # fp32: 1 byte + a scale


def test_two_training_steps_with_fp8_base_weights(created_sd1, tmp_path):
    """The "4 GB card" preset as the CPU runs it, in bf16 autocast over the float8 base weights."""
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = dataclasses.replace(apply_preset(TrainingParams(), "4 GB card", cuda=False), use_8bit_adam=False,
                                 mixed_precision="bf16", max_train_steps=2, resolution=32, hflip=False, seed=0, save_preview_every_n_steps=0)
    assert (params.base_weights, params.mixed_precision) == ("fp8", "bf16")
    result = train(models, "tiny", params, [concept], device="cpu")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    from safetensors.torch import load_file

    ups = [t for k, t in load_file(str(result.lora_path)).items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(t).all() for t in ups) and any(t.abs().sum() > 0 for t in ups)


def test_fp8_is_refused_with_one_line_where_it_cannot_work(monkeypatch):
    hardware = probe_hardware("cpu")
    check_options(TrainingParams(base_weights="fp8"), hardware)
    with pytest.raises(ConfigError, match=r"^Base Weight Storage fp8 \('base_weights'\) needs Use LORA"):
        check_options(TrainingParams(base_weights="fp8", use_lora=False), hardware)
    monkeypatch.setattr(fp8, "fp8_dtype", lambda: None)
    with pytest.raises(ConfigError) as refused:
        check_options(TrainingParams(base_weights="fp8"), hardware)
    assert "\n" not in str(refused.value) and "needs torch >= 2.1" in str(refused.value)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_over_fp8_base_weights_starts_as_the_base_layer(kind):
    """DoRA's magnitudes and its weight come from the float8 layer's real weight (values * scale), so before the
    first step the adapted layer computes what the float8 layer alone does."""
    from lora_trainer.lora import LoRAConv2d, LoRALinear, column_norms

    torch.manual_seed(0)
    base = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(4, 8, 3, padding=1)
    stored = nn.Sequential(base.requires_grad_(False))
    store_in_fp8(stored, torch.float32)
    layer = stored[0]
    real = layer.weight_fp8.float() * layer.weight_scale
    adapter = (LoRALinear if kind == "linear" else LoRAConv2d)(layer, rank=2, alpha=2.0, dora=True)
    assert torch.allclose(adapter.dora_scale, column_norms(real))
    nn.init.normal_(adapter.lora_down.weight)  # lora_up stays zero: the update is nothing yet
    x = torch.randn(3, 16) if kind == "linear" else torch.randn(2, 4, 6, 6)
    assert torch.allclose(adapter(x), layer(x), atol=1e-5)
