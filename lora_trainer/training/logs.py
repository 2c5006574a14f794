"""The run's figures on disk: a CSV always, TensorBoard event files when `tensorboard` is installed.

Each run writes into its own folder `<model>/logs/<revision>-<date>-<time>/`:
`training.csv` with one row per step (step, lifetime step, epoch, loss,
validation loss where one was computed, the learning rate of each optimizer
group, the step's seconds and, on a GPU, the peak memory in MB), flushed
after every row so it can be read while the run goes on; and, when the
`tensorboard` package is importable, event files of the same figures that
`tensorboard --logdir <model>/logs` shows, one run per folder.
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOGS_DIR = "logs"
CSV_FILE = "training.csv"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class RunLog:
    """Appends one row per step to the run's CSV (and TensorBoard when available)."""

    def __init__(self, model_dir: Path, revision: int, groups: list[str]):
        self.folder = Path(model_dir) / LOGS_DIR / f"{revision}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.groups = list(groups)
        self.path = self.folder / CSV_FILE
        self._file = self.path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(["step", "lifetime_step", "epoch", "loss", "val_loss",
                            *[f"lr_{name}" for name in self.groups], "step_seconds", "memory_mb"])
        self._file.flush()
        self._last = time.perf_counter()
        self._board = None
        if tensorboard_available():
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._board = SummaryWriter(log_dir=str(self.folder))
            except ImportError as e:  # tensorboard present but incomplete (e.g. no protobuf): the CSV still goes on
                log.warning("TensorBoard files are not written (%s); the CSV is", e)
        log.info("Writing the run's figures to %s%s", self.folder, " (CSV and TensorBoard)" if self._board else "")

    def row(self, *, step: int, lifetime_step: int, epoch: int, loss: float, val_loss: float | None,
            lrs: list[float], memory_mb: float | None) -> None:
        """Write the figures of `step` (seconds since the previous row are measured here)."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        lrs = list(lrs) + [None] * (len(self.groups) - len(lrs))
        self._csv.writerow([step, lifetime_step, epoch, _number(loss), _number(val_loss),
                            *[_number(lr) for lr in lrs[:len(self.groups)]], f"{seconds:.4f}", _number(memory_mb)])
        self._file.flush()
        if self._board is not None:
            self._board.add_scalar("loss/train", loss, lifetime_step)
            if val_loss is not None:
                self._board.add_scalar("loss/validation", val_loss, lifetime_step)
            for name, lr in zip(self.groups, lrs):
                if lr is not None:
                    self._board.add_scalar(f"lr/{name}", lr, lifetime_step)
            self._board.add_scalar("time/step_seconds", seconds, lifetime_step)
            if memory_mb is not None:
                self._board.add_scalar("memory/peak_mb", memory_mb, lifetime_step)

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def group_names(count: int) -> list[str]:
    """Names of the optimizer's parameter groups in the order `adapters.trainable_groups` makes them."""
    names = ["unet", "text_encoder", "text_encoder_2"]
    return names[:count] + [f"group{i}" for i in range(len(names), count)]


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))
