"""The optimizer (AdamW, bitsandbytes' 8-bit AdamW, or Prodigy) and the learning-rate schedule."""
from __future__ import annotations

import contextlib
import io

import torch

from ..config import TrainingParams

BETAS = (0.9, 0.999)
EPS = 1e-8


def make_optimizer(groups: list[dict], params: TrainingParams) -> torch.optim.Optimizer:
    """AdamW (or Prodigy) over parameter groups that each carry their own "lr".

    "Use 8bit Adam" keeps the moments in 8 bits (bitsandbytes); Optimizer
    "Prodigy" estimates the step size itself (prodigyopt; its "lr" values
    multiply the estimate, 1.0 as its authors advise). Both are checked by
    `hardware.check_options` before anything is loaded.
    """
    if params.optimizer == "Prodigy":
        from prodigyopt import Prodigy

        # prodigyopt prints a note about weight decay; the command line's stdout is the LoRA's path alone.
        with contextlib.redirect_stdout(io.StringIO()):
            return Prodigy(groups, lr=1.0, betas=BETAS, weight_decay=params.weight_decay, decouple=True,
                           d_coef=params.prodigy_d_coef, safeguard_warmup=params.prodigy_safeguard_warmup,
                           use_bias_correction=params.prodigy_use_bias_correction)
    if params.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=BETAS, weight_decay=params.weight_decay, eps=EPS)
    # foreach: one kernel per operation over all the weights instead of one per weight, with the very same
    # figures. torch picks it on CUDA by itself, not on the CPU, where it halves the optimizer's time.
    # (The fused kernel rounds otherwise, and accelerate's gradient scaler cannot tell its skipped steps.)
    return torch.optim.AdamW(groups, betas=BETAS, weight_decay=params.weight_decay, eps=EPS, foreach=True)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, params: TrainingParams, total_steps: int,
                      num_processes: int = 1):
    """The chosen schedule from diffusers over this run's optimizer steps.

    Accelerate steps a prepared scheduler once per process at every step, so
    warmup and length are counted in process-steps, as diffusers' scripts do.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(params.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=params.lr_warmup_steps * num_processes,
                         num_training_steps=max(total_steps, 1) * num_processes,
                         num_cycles=params.lr_num_cycles, power=params.lr_power)

