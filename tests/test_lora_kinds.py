"""LoCon and DoRA: the files the web UI's built-in Lora loads with every key matched, and merges that equal
the adapters applied; training with them saves, resumes and refuses a changed kind."""
from __future__ import annotations

import importlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers_lora import metadata_for, randomize
from helpers_merge import load_checkpoint_parts, make_model, text_output, unet_output
from helpers_train import instance_pictures, private_models
from lora_trainer.checkpoint import load_model_spec
from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.errors import ModelError
from lora_trainer.kohya import read_kohya_lora, resolve, target_table
from lora_trainer.lora import LoRAConv2d, load_lora_state_dict, lora_state_dict, remove_lora, save_lora
from lora_trainer.merge import merge_lora
from lora_trainer.train import train
from lora_trainer.training.adapters import attach_lora
from lora_trainer.training.parts import load_working_model
from webui_env import StandinWebUI

KINDS = {"locon": dict(conv_rank=3, conv_alpha=2.0), "dora": dict(use_dora=True),
         "locon+dora": dict(conv_rank=3, conv_alpha=2.0, use_dora=True)}


def _adapters(folder, kind: str):
    """The tiny model's UNet and text encoder with trained-looking adapters of `kind` (non-zero up, DoRA
    magnitudes away from the base's norms)."""
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"))
    unet, text = model.unet.float().eval(), model.text_encoder.float().eval()
    params = TrainingParams(rank=4, lora_alpha=2.0, text_encoder_rank=4, text_encoder_alpha=2.0, **KINDS[kind])
    adapters = attach_lora(model, params)
    randomize(adapters.unet, 3)
    randomize(adapters.text, 4)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in adapters.all.values():
            if adapter.dora_scale is not None:
                adapter.dora_scale.mul_(1 + 0.3 * torch.rand(adapter.dora_scale.shape, generator=generator))
    return unet, text, adapters, params


@pytest.mark.parametrize("kind, variant", [("locon", "sd1"), ("dora", "sd2v"), ("locon+dora", "sd1")])
def test_files_load_in_the_web_ui_and_merge_exactly(kind, variant, tiny_sd1, tiny_sd2v, models_dir, tmp_path):
    checkpoint = tiny_sd1 if variant == "sd1" else tiny_sd2v
    folder = make_model(models_dir, checkpoint, "tiny")
    unet, text, adapters, params = _adapters(folder, kind)
    convs = [n for n, a in adapters.unet.items() if isinstance(a, LoRAConv2d) and a.base.kernel_size != (1, 1)]
    assert bool(convs) == ("locon" in kind)
    expected = unet_output(unet), text_output(text)
    remove_lora(unet)
    remove_lora(text)
    base = unet_output(unet), text_output(text)
    tensors = adapters.state_dict()
    assert any(k.endswith(".dora_scale") for k in tensors) == ("dora" in kind)
    path = save_lora(models_dir.lora / "tiny_1000.safetensors", tensors, metadata_for(folder, params))

    # The web UI's built-in Lora matches every key of the file to a layer of the loaded checkpoint.
    with StandinWebUI(tmp_path / "webui") as webui:
        shutil.copy(models_dir.checkpoints / checkpoint.name, tmp_path / "webui-model.safetensors")
        webui.shared.sd_model = SimpleNamespace(sd_model_checkpoint=str(tmp_path / "webui-model.safetensors"))
        on_disk = importlib.import_module("network").NetworkOnDisk("tiny_1000", str(path))
        net = webui.networks.load_network("tiny_1000", on_disk)
    assert net.unmatched_keys == ()
    assert len(net.modules) == len(adapters.all)
    for weights in net.modules.values():
        layer_rows = weights.sd_module.weight.shape[0]
        up = weights.w["lora_up.weight"]
        assert up.shape[0] in (layer_rows, layer_rows // 3)  # SD 2.x q/k/v: rows of one in_proj weight
        if "dora" in kind:  # network.py apply_weight_decompose normalises per input column
            down = weights.w["lora_down.weight"]
            assert tuple(weights.w["dora_scale"].shape) == (1, down.shape[1], *[1] * (down.dim() - 2))
    family = "sd1" if variant == "sd1" else "sd2"
    assert set(resolve(read_kohya_lora(path), target_table(load_model_spec(folder)), family=family,
                       where="the tiny model")) == set(adapters.all)

    # Generate Ckpt gives what the model with the adapters applied gives.
    merged = merge_lora(models_dir, "tiny", lora=str(path))
    merged_unet, merged_text = load_checkpoint_parts(merged, tmp_path / "back")
    for have, want, was in zip((unet_output(merged_unet), text_output(merged_text)), expected, base):
        assert (want - was).abs().max() > 1e-2
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def test_metadata_names_the_kind_as_kohya_and_lycoris_do(tiny_sd1, models_dir):
    folder = make_model(models_dir, tiny_sd1, "tiny")
    args = json.loads(metadata_for(folder, TrainingParams(conv_rank=8, conv_alpha=4, use_dora=True))["ss_network_args"])
    assert args == {"conv_dim": "8", "conv_alpha": "4.0", "dora_wd": "True"}


def test_training_saves_resumes_and_refuses_a_changed_kind(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(resolution=32, hflip=False, seed=0, max_train_steps=1, train_text_encoder=False,
                            unet_learning_rate=1e-2, **KINDS["locon+dora"])
    first = train(models, "tiny", params, [concept], device="cpu")
    lora = read_kohya_lora(first.lora_path)
    assert any(m.down.dim() == 4 and m.down.shape[2:] == (3, 3) and m.rank == 3 for m in lora.modules.values())
    assert all(m.dora_scale is not None for m in lora.modules.values())
    second = train(models, "tiny", params, [concept], device="cpu")
    assert second.lifetime_steps == first.lifetime_steps + 1
    for changed, option in ((dict(conv_rank=4), "conv_rank"), (dict(use_dora=False), "use_dora")):
        with pytest.raises(ModelError, match=option):
            train(models, "tiny", TrainingParams(**{**params.to_dict(), **changed}), [concept], device="cpu")


@pytest.mark.parametrize("kind", ["dora", "locon+dora"])
def test_dora_layers_use_the_weight_the_web_ui_applies(kind, tiny_sd1, models_dir, tmp_path):
    """The web UI v1.10.1 divides `W + dW` by its norm per input column whatever the shape of `dora_scale`;
    a per-row magnitude (what this project wrote before) drew another picture there than Generate Ckpt
    gave (seen in the real web UI), so each layer must use exactly the web UI's weight, at strength 1 and 0.5."""
    folder = make_model(models_dir, tiny_sd1, "tiny")
    _unet, _text, adapters, _params = _adapters(folder, kind)
    with StandinWebUI(tmp_path / "webui"):
        decompose = importlib.import_module("network").apply_weight_decompose
    assert any(isinstance(a, LoRAConv2d) for a in adapters.all.values()) == ("locon" in kind)
    for name, adapter in adapters.all.items():
        base = adapter.base.weight.detach().float()
        with torch.no_grad():
            for strength in (1.0, 0.5):
                adapter.multiplier = strength
                webui = base + decompose(adapter.delta_weight().float(), base, adapter.dora_scale.detach()) * strength
                torch.testing.assert_close(adapter.dora_weight().float(), webui, atol=1e-5, rtol=1e-4, msg=name)


def test_a_per_row_dora_file_is_refused_for_training_on_with_the_reason(tiny_sd1, models_dir):
    folder = make_model(models_dir, tiny_sd1, "tiny")
    _unet, _text, adapters, _params = _adapters(folder, "dora")
    tensors = adapters.state_dict()
    for key in [k for k in tensors if k.endswith(".dora_scale")]:
        tensors[key] = torch.ones(tensors[key.replace("dora_scale", "lora_up.weight")].shape[0], 1)
    with pytest.raises(ModelError, match="per output row.*train a new model"):
        load_lora_state_dict(adapters.unet, {k: v for k, v in tensors.items() if k.startswith("lora_unet_")},
                             source="old.safetensors")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_dora_layer_before_its_first_step_computes_exactly_what_its_base_does(kind):
    """dora_scale starts as the base's column norms and W + dW is W, so the layer's scale is exactly 1: its output
    is its base's to the bit, in fp32 and under bf16 autocast too (an epsilon added to the norms made it round
    otherwise, a few per cent apart after a UNet's layers in bf16)."""
    from lora_trainer.lora import LoRALinear

    torch.manual_seed(0)
    base = (torch.nn.Linear(64, 32) if kind == "linear" else torch.nn.Conv2d(8, 16, 3, padding=1)).requires_grad_(False)
    layer = (LoRALinear if kind == "linear" else LoRAConv2d)(base, rank=4, alpha=2.0, dora=True)
    x = torch.randn(4, 64) if kind == "linear" else torch.randn(2, 8, 6, 6)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(layer(x), base(x)), f"autocast {autocast}"
