"""Where the extension runs: the web UI, Forge, or on its own.

The UI layer talks to its host only through `Host`. The standalone app uses
`Host` itself (every hook does nothing); the web UI's adapter (in
`lora_trainer/ui/webui_host.py`) overrides the hooks with calls into the web
UI's `modules`. This module imports neither gradio nor the web UI.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from .host import ModelsDir


class Host:
    """The standalone host: folders under one models directory, nothing to free or refresh."""

    name = "standalone"

    def __init__(self, models: ModelsDir):
        self.models = models

    @classmethod
    def at(cls, models_dir: str | Path) -> "Host":
        return cls(ModelsDir.at(models_dir))

    def release_gpu(self) -> None:
        """Before training or class pictures: move the host's own model off the GPU."""

    def restore_gpu(self) -> None:
        """After the job, also after an error: bring the host's model back."""

    def checkpoints_changed(self) -> None:
        """A checkpoint was written: refresh the host's checkpoint list."""

    def loras_changed(self) -> None:
        """A LoRA was written: refresh the host's Lora list."""

    def interrupted(self) -> bool:
        """Whether the host's own Interrupt button was pressed during our job."""
        return False

    def clear_interrupt(self) -> None:
        """Forget an Interrupt pressed before our job started."""


@contextlib.contextmanager
def gpu_lent_to_job(host: Host) -> Iterator[None]:
    """Release the host's GPU memory for a job and give it back afterwards, whatever happens."""
    host.release_gpu()
    try:
        yield
    finally:
        host.restore_gpu()
