"""Shared pieces of test_train.py: pictures to train on, fixed-noise denoising loss, UNet outputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from helpers_data import BLUE, RED, halves, solid

from lora_trainer.host import ModelsDir
from lora_trainer.images import load_image, resize_to, to_tensor


def private_models(created, root: Path, name: str = "tiny") -> ModelsDir:
    """A copy of a session's tiny working model `name` (and its checkpoint) that a test may train."""
    models = ModelsDir.at(root)
    shutil.copytree(created.model_dir(name), models.model_dir(name))
    shutil.copytree(created.checkpoints, models.checkpoints)
    return models


def instance_pictures(folder: Path) -> Path:
    """Three pictures of one subject (red and blue halves), with captions."""
    halves(folder / "a.png", RED, BLUE, size=(40, 40))
    halves(folder / "b.png", RED, BLUE, size=(48, 32))
    solid(folder / "c.png", RED, size=(32, 32))
    for name in ("a", "b", "c"):
        (folder / f"{name}.txt").write_text("a red thing", encoding="utf-8")
    return folder


def denoising_loss(model, pictures: list[Path], prompts: list[str], *, resolution: int, seed: int = 0) -> float:
    """Mean epsilon/v loss of `model` (a WorkingModel) on the pictures at fixed noise and timesteps."""
    pixels = torch.stack([to_tensor(resize_to(load_image(p), (resolution, resolution), center_crop=True))
                          for p in pictures])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean * model.latent_scale
        ids = model.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = model.text_encoder(ids)[0]
        total = 0.0
        for t in (50, 250, 450, 650, 850):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
            noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = model.unet(noisy, timesteps, hidden).sample
            total += torch.mean((prediction - noise) ** 2).item()
    return total / 5


def unet_output(unet, seed: int = 0, size: int = 4, width: int = 64) -> torch.Tensor:
    """The UNet's output on fixed random inputs."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((2, 4, size, size), generator=generator)
    hidden = torch.randn((2, 77, width), generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), hidden).sample
