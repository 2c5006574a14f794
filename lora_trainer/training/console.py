"""The console progress bar and the `Progress` reports the UI polls: the same figures in both."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..progress import Progress, Report


class ProgressDisplay:
    """A tqdm bar with loss, learning rate, it/s and (CUDA) peak memory; each step also goes to `report`."""

    def __init__(self, total_steps: int, *, report: Report, device: torch.device, lifetime_start: int,
                 enabled: bool = True, first_step: int = 0):
        self.total, self.report, self.device, self.first_step = total_steps, report, device, first_step
        self.lifetime_start, self.enabled = lifetime_start, enabled
        self.samples: list[Path] = []
        self.started = time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=first_step, desc="Training", unit="step", disable=not enabled)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def memory_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def step(self, step: int, epoch: int, loss: float, lr: float) -> Progress:
        """Advance the bar to `step` (steps done in this run) and report it."""
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else None
        progress = Progress(job="train", message=f"Training step {step}/{self.total}", step=step,
                            total_steps=self.total, epoch=epoch, loss=loss, lr=lr, it_per_s=rate,
                            memory_mb=self.memory_mb(), lifetime_steps=self.lifetime_start + step,
                            seconds_left=(self.total - step) / rate if rate else None, samples=list(self.samples))
        if self.enabled:
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
            if progress.memory_mb is not None:
                postfix["mem"] = f"{progress.memory_mb / 1024:.2f}GB"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
            self.report(progress)
        return progress

    def validation(self, step: int, loss: float) -> None:
        """Report the validation loss measured after `step`."""
        if self.enabled:
            self.report(Progress(job="train", message=f"Validation loss at step {step}: {loss:.4f}", step=step,
                                 total_steps=self.total, val_loss=loss, lifetime_steps=self.lifetime_start + step,
                                 samples=list(self.samples)))

    def message(self, text: str, step: int) -> None:
        """A report without a new step (saving, samples)."""
        if self.enabled:
            self.report(Progress(job="train", message=text, step=step, total_steps=self.total,
                                 lifetime_steps=self.lifetime_start + step, samples=list(self.samples)))

    def close(self) -> None:
        self.bar.close()
