"""The denoising loss of DreamBooth: noise, the target the UNet learns, min-SNR and prior preservation.

A batch holds the instance rows first and the class rows after them
(`data.collate_examples`). The loss is the mean squared error of the instance
rows plus Prior Loss Weight times that of the class rows (DreamBooth's prior
preservation, diffusers' `train_dreambooth_lora.py`). With Min SNR Gamma each
row's error is weighted by min(SNR, gamma) / SNR for epsilon models and
min(SNR, gamma) / (SNR + 1) for v-prediction models (Hang et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def sample_noise(latents: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; Noise Offset adds a random shift per picture and channel."""
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                             dtype=latents.dtype)
    return noise


def sample_timesteps(scheduler, batch: int, device: torch.device) -> torch.Tensor:
    """One random training timestep per picture."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity sqrt(a)*noise - sqrt(1-a)*x0 (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep."""
    alphas = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas / (1.0 - alphas)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-row loss weights of Min-SNR weighting; all ones when gamma is 0 (off)."""
    if not gamma:
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


@dataclass
class Loss:
    total: torch.Tensor      # what backward() is called on
    instance: torch.Tensor   # mean weighted error of the instance rows
    prior: torch.Tensor      # mean weighted error of the class rows (0 without any)


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, is_class: torch.Tensor, *,
                    prior_loss_weight: float, weights: torch.Tensor | None = None,
                    pixel_weights: torch.Tensor | None = None) -> Loss:
    """Instance error + prior_loss_weight * class error, each the mean over its rows of the
    (weighted) per-row mean squared error, computed in fp32. `pixel_weights` [B, 1, h, w]
    (Masked Loss) weight each latent pixel's error before the mean."""
    error = (prediction.float() - target.float()) ** 2
    if pixel_weights is not None:
        error = error * pixel_weights.float()
    per_row = error.mean(dim=tuple(range(1, prediction.dim())))
    if weights is not None:
        per_row = per_row * weights.float()
    is_class = is_class.to(per_row.device)
    instance = per_row[~is_class].mean()
    prior = per_row[is_class].mean() if bool(is_class.any()) else per_row.new_zeros(())
    return Loss(instance + prior_loss_weight * prior, instance, prior)
