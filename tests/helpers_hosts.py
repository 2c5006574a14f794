"""A Host for tests: it writes down every hook call, and its Interrupt can be pressed."""
from __future__ import annotations

import threading

from lora_trainer.hosts import Host


class RecordingHost(Host):
    """A host that writes down every hook call, and whose Interrupt can be pressed."""

    def __init__(self, models):
        super().__init__(models)
        self.calls: list[str] = []
        self.interrupt = threading.Event()

    def release_gpu(self):
        self.calls.append("release_gpu")

    def restore_gpu(self):
        self.calls.append("restore_gpu")

    def checkpoints_changed(self):
        self.calls.append("checkpoints_changed")

    def loras_changed(self):
        self.calls.append("loras_changed")

    def interrupted(self):
        return self.interrupt.is_set()

    def clear_interrupt(self):
        self.calls.append("clear_interrupt")
        self.interrupt.clear()
