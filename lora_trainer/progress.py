"""What a running job reports, and how it is asked to stop: shared by the console, the CLI and the UI.

The core never imports the UI. A long job (training, class pictures, merge)
takes a `report` callable that receives `Progress` objects and a `cancel`
object with `is_set()` (a `threading.Event` does); the UI polls the last
report, the console prints a bar.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class Progress:
    """One report of a running job. Figures that do not apply stay None."""

    job: str = ""                       # "train", "class images", "merge", "create"
    message: str = ""                   # one line for the status bar
    step: int = 0                       # steps done in this run
    total_steps: int = 0
    epoch: int = 0
    loss: Optional[float] = None
    lr: Optional[float] = None
    it_per_s: Optional[float] = None
    memory_mb: Optional[float] = None   # CUDA: peak allocated in this run
    seconds_left: Optional[float] = None
    lifetime_steps: Optional[int] = None
    samples: list[Path] = field(default_factory=list)   # sample pictures written so far, newest last
    note: str = ""                      # a line the job's outcome must carry (e.g. a LoRA of another model)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass
class TrainResult:
    """What `train` hands back."""

    lora_path: Optional[Path]           # the LoRA file written (None for a full fine-tune)
    lifetime_steps: int
    revision: int
    steps: int                          # steps taken in this run
    cancelled: bool = False
    samples: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


Report = Callable[[Progress], None]


def no_report(progress: Progress) -> None:
    """The default `report`: say nothing."""
