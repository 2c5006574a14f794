"""Masked loss: `<name>.mask.png` or the picture's alpha weights the loss per latent pixel; mask files are
not training pictures; a mask of zeros gives zero gradient, pictures without a mask train as before."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from helpers_data import BLUE, RED, halves, solid
from PIL import Image

from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.data import collate_examples, collect_examples, list_images
from lora_trainer.training.adapters import attach_lora
from lora_trainer.training.batches import make_dataset
from lora_trainer.training.loop import compute_loss
from lora_trainer.training.parts import load_working_model

RES = 32


def _gradients(created_sd1, folder, *, masked: bool) -> list[torch.Tensor]:
    """Gradients of the LoRA adapters after one batch of the pictures in `folder`, at a fixed seed."""
    model_dir = created_sd1.model_dir("tiny")
    model = load_working_model(model_dir, ModelInfo.load(model_dir / "model_info.json"))
    params = TrainingParams(resolution=RES, hflip=False, train_text_encoder=False, masked_loss=masked,
                            cache_latents=False)
    torch.manual_seed(0)
    adapters = attach_lora(model, params)
    for adapter in adapters.all.values():  # a non-zero up matrix: gradients reach the down matrix too
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.1)
    instance, class_ = collect_examples([Concept(instance_data_dir=str(folder), instance_prompt="scs")], folder)
    dataset = make_dataset(instance, class_, params, model.tokenizer, cached=False, seed=0)
    batch = collate_examples([dataset[i] for i in range(len(dataset))])
    loop = SimpleNamespace(model=model, params=params, accelerator=SimpleNamespace(device=torch.device("cpu")),
                           unet=model.unet, text_encoder=model.text_encoder, text_encoders=[model.text_encoder],
                           text_cache=None, train_text=False, compiled_unet=None)
    torch.manual_seed(1)
    compute_loss(loop, batch).total.backward()
    return [p.grad.clone() for a in adapters.all.values() for p in a.parameters() if p.grad is not None]


def test_a_mask_of_zeros_gives_zero_gradient(created_sd1, tmp_path):
    folder = tmp_path / "pictures"
    halves(folder / "a.png", RED, BLUE, size=(32, 32))
    Image.new("L", (32, 32), 0).save(folder / "a.mask.png")
    masked = _gradients(created_sd1, folder, masked=True)
    assert masked and all(float(g.abs().max()) == 0.0 for g in masked)
    unmasked = _gradients(created_sd1, folder, masked=False)  # the option off: the mask file is ignored
    assert any(float(g.abs().max()) > 0.0 for g in unmasked)


def test_pictures_without_a_mask_train_as_without_the_option(created_sd1, tmp_path):
    folder = tmp_path / "pictures"
    halves(folder / "a.png", RED, BLUE, size=(32, 32))
    with_option = _gradients(created_sd1, folder, masked=True)
    without = _gradients(created_sd1, folder, masked=False)
    assert all(torch.equal(a, b) for a, b in zip(with_option, without))


def test_mask_file_and_alpha_are_placed_like_the_picture(tmp_path):
    folder = tmp_path / "pictures"
    solid(folder / "a.png", RED, size=(64, 32))
    left_black = Image.new("L", (64, 32), 255)
    left_black.paste(0, (0, 0, 32, 32))
    left_black.save(folder / "a.mask.png")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[16:, :, 3] = 0  # bottom half transparent
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")
    assert [p.name for p in list_images(folder)] == ["a.png", "b.png"]  # the mask is not a picture to train on
    instance, _ = collect_examples([Concept(instance_data_dir=str(folder), instance_prompt="scs")], folder)
    dataset = make_dataset(instance, [], TrainingParams(resolution=RES, hflip=False, masked_loss=True,
                                                        center_crop=True), None, cached=False, seed=0)
    cropped = dataset[0]["loss_mask"][0]   # 64x32 cut to its middle 32x32: left half of that is black
    assert cropped.shape == (RES, RES)
    assert float(cropped[:, :12].max()) < 0.05 and float(cropped[:, 20:].min()) > 0.95
    alpha = dataset[1]["loss_mask"][0]
    assert float(alpha[:14].min()) > 0.95 and float(alpha[18:].max()) < 0.05
