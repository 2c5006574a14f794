"""Saving during and at the end of a run: the LoRA file, the resume state and the model's info.

Written in that order, so the model info never names a LoRA that is not there.
A full fine-tune writes its weights into the model folder instead of a LoRA.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelInfo, TrainingParams
from ..host import ModelsDir
from .adapters import Adapters
from .ema import EMA, ema_applied
from .outputs import file_steps, info_after, save_full_model, save_info, write_lora
from .resume import save_resume_state

log = logging.getLogger(__name__)


@dataclass
class Snapshots:
    """Saves the run's state; remembers what it wrote."""

    models: ModelsDir
    model_dir: Path
    start_info: ModelInfo
    params: TrainingParams
    name: str
    seed: int
    num_images: int
    started_at: float
    source_checkpoint: Path | None = None
    plan: dict | None = None               # the run's plan (resume.run_plan), kept with the resume state
    saved_at_step: int = -1
    lora_path: Path | None = None
    keep: set[Path] = field(default_factory=set)   # never pruned as an intermediate file (the best by validation)

    def save(self, step: int, epochs: int, *, adapters: Adapters | None, optimizer, unet, text_encoder,
             position=None, ema: EMA | None = None) -> None:
        """Save the state after `step` (> 0) steps of this run and `epochs` epochs; once per step.
        `position` (training.position.RunPosition, after `step`) lets a later run finish this one exactly.
        With `ema` the LoRA file (or the fine-tuned model) holds the averages, the resume state the raw
        weights and the averages."""
        if step == self.saved_at_step:
            return
        info = info_after(self.start_info, run_steps=step, run_epochs=epochs)
        if adapters is None:
            with ema_applied(ema):
                save_full_model(self.model_dir, unet, text_encoder if self.params.train_text_encoder else None)
        else:
            tensors = adapters.state_dict()
            with ema_applied(ema):
                published = adapters.state_dict()
            path = write_lora(self.models.lora, published, info, self.params, name=self.name,
                              steps=file_steps(self.params, info.lifetime_steps, step), run_steps=step,
                              run_epochs=epochs, num_images=self.num_images, started_at=self.started_at,
                              finished_at=time.time(), seed=self.seed, source_checkpoint=self.source_checkpoint)
            save_resume_state(self.model_dir, tensors, optimizer.state_dict(),
                              lifetime_steps=info.lifetime_steps, lora_file=path.name, plan=self.plan,
                              position=position if position is not None and position.step == step else None,
                              ema=ema.state_dict() if ema is not None else None)
            info.latest_lora = path.relative_to(self.models.lora).as_posix()
            self.lora_path = path
        save_info(self.model_dir, info)
        self.saved_at_step = step
