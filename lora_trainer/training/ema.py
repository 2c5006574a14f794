"""EMA: an exponential moving average of the trained weights (LoRA adapters, or the UNet and text
encoder of a full fine-tune).

After every optimizer step each average moves towards its weight:
`ema = decay * ema + (1 - decay) * weight`, starting from the weights the run
starts with. With "Use EMA" the averages are what is saved and what draws the
samples (they are put into the model for that and taken out again); training
itself goes on with the raw weights. A LoRA run keeps the averages with the
resume state (`resume/ema.safetensors`), so the next run continues them; a full
fine-tune saves the averages as the model, and the next run starts from them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


class EMA:
    """Averages of `params` (kept in fp32 on their device) with `decay`."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), float(decay)
        self.averages = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move every average towards its weight by (1 - decay)."""
        for average, param in zip(self.averages, self.params):
            average.mul_(self.decay).add_(param.detach().float(), alpha=1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in the model for the duration (saving, samples); the raw weights back afterwards."""
        raw = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for param, average in zip(self.params, self.averages):
                    param.copy_(average.to(param.dtype))
            yield
        finally:
            with torch.no_grad():
                for param, weight in zip(self.params, raw):
                    param.copy_(weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": average.detach().cpu() for i, average in enumerate(self.averages)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> bool:
        """Continue saved averages when they fit these weights (same count and shapes); returns whether they did."""
        if len(state) != len(self.averages) or any(
                tuple(state.get(f"ema.{i}", torch.empty(0)).shape) != tuple(a.shape)
                for i, a in enumerate(self.averages)):
            log.warning("The saved EMA weights do not fit this run's weights; the average starts again from them")
            return False
        for i, average in enumerate(self.averages):
            average.copy_(state[f"ema.{i}"].to(average.device, torch.float32))
        return True


@contextmanager
def ema_applied(ema: EMA | None) -> Iterator[None]:
    """`ema.applied()`, or nothing without EMA."""
    if ema is None:
        yield
    else:
        with ema.applied():
            yield
