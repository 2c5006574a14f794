"""When a run saves on its way, which of those files it keeps, and the sample grid drawn at each save.

- `SaveSchedule`: "Save Model Frequency (Step)" and "(Epochs)": a save after
  every N steps and after every N finished epochs (not at the last step: the
  final save follows then anyway).
- `Retention`: with "Keep Last N Intermediate Files" only the newest N LoRA
  files a run wrote on its way stay; the final file is never one of them, and
  a file `protect`ed (the best one by validation loss, when validation runs)
  is never removed. Files of earlier runs are not touched.
- `draw_grid`: one picture per save, `samples/<name>_<steps>_grid.png`: a row
  per "Sample Grid Prompts" line, a column per "Sample Grid Seeds" seed, the
  same prompts and seeds at every save so the pictures compare.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Concept, TrainingParams
from ..errors import ConfigError
from ..fileio import atomic_path
from ..pipeline import draw_pictures
from .outputs import free_path
from .parts import WorkingModel
from .samples import SAMPLES_DIR, drawing_pipeline

log = logging.getLogger(__name__)


@dataclass
class SaveSchedule:
    """Whether the step just taken is a save point of the run."""

    params: TrainingParams
    total_steps: int
    last_epochs: int = 0

    def due(self, step: int, epochs: int) -> bool:
        """`epochs` is the count of epochs finished after `step`; call once per step, in order."""
        every_steps, every_epochs = self.params.save_every_n_steps, self.params.save_every_n_epochs
        epoch_done = epochs != self.last_epochs
        self.last_epochs = epochs
        by_steps = bool(every_steps) and step % every_steps == 0
        by_epochs = bool(every_epochs) and epoch_done and epochs % every_epochs == 0
        return (by_steps or by_epochs) and step < self.total_steps


@dataclass
class Retention:
    """Removes a run's older intermediate LoRA files beyond the newest `keep_last` (0: keeps all)."""

    keep_last: int
    intermediate: list[Path] = field(default_factory=list)
    protected: set[Path] = field(default_factory=set)

    def protect(self, path: Path) -> None:
        """Never remove `path` (hook for the best file by validation loss)."""
        self.protected.add(Path(path))

    def saved(self, path: Path | None) -> list[Path]:
        """Record an intermediate file just written; remove the ones now beyond the newest `keep_last`.
        Returns the removed paths."""
        if path is None:
            return []
        self.intermediate.append(Path(path))
        return self.prune()

    def settle(self, protected: set[Path]) -> list[Path]:
        """At the end of the run: `protected` is what must stay now (the best file, which may have moved on to
        the final one), and the files an earlier best kept beyond `keep_last` go. Returns the removed paths."""
        self.protected = {Path(path) for path in protected}
        return self.prune()

    def prune(self) -> list[Path]:
        """Remove the unprotected intermediate files beyond the newest `keep_last`; return them."""
        if not self.keep_last:
            return []
        removed = []
        candidates = [p for p in self.intermediate if p not in self.protected]
        for old in candidates[:-self.keep_last]:
            old.unlink(missing_ok=True)
            self.intermediate.remove(old)
            removed.append(old)
            log.info("Removed %s: Keep Last N Intermediate Files is %d", old.name, self.keep_last)
        return removed


def grid_prompts(params: TrainingParams) -> list[str]:
    """The non-blank lines of Sample Grid Prompts."""
    return [line.strip() for line in params.sample_grid_prompts.splitlines() if line.strip()]


def grid_seeds(params: TrainingParams) -> list[int]:
    """Sample Grid Seeds as integers. Raises ConfigError naming the field for anything else."""
    try:
        seeds = [int(s) for s in params.sample_grid_seeds.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"Sample Grid Seeds ('sample_grid_seeds'): {params.sample_grid_seeds!r} is not a list of "
                          "whole numbers; write e.g. '1, 2, 3'") from None
    return seeds or [0]


@torch.no_grad()
def draw_grid(model: WorkingModel, unet, text_encoder, prompts: list[str], seeds: list[int], concept: Concept | None, *,
              folder: Path, stem: str, resolution: int, device: torch.device, autocast,
              text_encoder_2=None) -> Path | None:
    """Draw every prompt with every seed and save them as one grid picture; return its path (None without
    prompts). Steps, CFG scale and negative prompt are those of the first concept's samples."""
    if not prompts:
        return None
    from PIL import Image

    concept = concept or Concept()
    grid = Image.new("RGB", (resolution * len(seeds), resolution * len(prompts)))
    with drawing_pipeline(model, unet, text_encoder, device, text_encoder_2) as pipe:
        for row, prompt in enumerate(prompts):
            for column, seed in enumerate(seeds):
                with autocast():
                    image = draw_pictures(pipe, prompt=prompt,
                                          negative_prompt=concept.save_sample_negative_prompt.strip() or None,
                                          num_inference_steps=concept.save_infer_steps,
                                          guidance_scale=concept.save_guidance_scale, height=resolution,
                                          width=resolution, generator=torch.Generator("cpu").manual_seed(seed))[0]
                grid.paste(image.convert("RGB").resize((resolution, resolution)), (column * resolution, row * resolution))
    path = free_path(Path(folder) / SAMPLES_DIR / f"{stem}_grid.png")
    with atomic_path(path, overwrite=False) as tmp:
        grid.save(tmp, format="PNG")
    log.info("Saved the sample grid %s", path)
    return path
