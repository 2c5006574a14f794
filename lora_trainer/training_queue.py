"""The training queue: several trainings run one after another, unattended.

Each item is a model with the settings it is to train with (Parameters and
Concepts as dicts, frozen when it was added). The queue lives in
`<models>/lora_trainer/queue.json`, rewritten atomically at every change, so it
survives a restart of the app: an item that was running when the app stopped
goes back to "pending" (training continues from its last save). `run_queue`
takes the pending items in order; an item that fails is marked "failed" with
its error and the next one starts; a Cancel stops the queue after saving the
running item, which stays "cancelled".
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .config import CONCEPTS_FILE, PARAMS_FILE, Concept, TrainingParams, load_concepts
from .errors import ConfigError
from .fileio import atomic_write_text
from .host import ModelsDir
from .progress import CancelFlag, Report, no_report

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.json"
STATUSES = ("pending", "running", "done", "failed", "cancelled")


@dataclass
class QueueItem:
    model: str
    params: dict
    concepts: list[dict]
    status: str = "pending"
    error: str = ""
    lora: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    added_at: float = field(default_factory=time.time)

    def describe(self) -> str:
        tail = f": {self.error}" if self.error else (f": {self.lora}" if self.lora else "")
        return f"{self.model} [{self.status}]{tail}"


class TrainingQueue:
    """The items of `path` (a JSON list); every change is written back at once. Thread-safe."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self.items: list[QueueItem] = self._read()

    @classmethod
    def at(cls, models: ModelsDir) -> "TrainingQueue":
        return cls(models.working / QUEUE_FILE)

    def _read(self) -> list[QueueItem]:
        """Raises ConfigError naming the file when it is not a queue."""
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            items = [QueueItem(**entry) for entry in data]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ConfigError(f"{self.path}: not a training queue ({e}); fix or delete the file") from None
        for item in items:
            if item.status == "running":  # the app stopped while it trained: it continues from its last save
                item.status = "pending"
        return items

    def save(self) -> None:
        with self._lock:
            atomic_write_text(self.path, json.dumps([asdict(i) for i in self.items], indent=2) + "\n")

    def add(self, model: str, params: TrainingParams, concepts: list[Concept]) -> QueueItem:
        """Append a training of `model` with these settings; returns the item."""
        item = QueueItem(model, params.to_dict(), [c.to_dict() for c in concepts])
        with self._lock:
            self.items.append(item)
            self.save()
        log.info("Queued training of %s (%d waiting)", model, len(self.pending()))
        return item

    def pending(self) -> list[QueueItem]:
        with self._lock:
            return [i for i in self.items if i.status == "pending"]

    def mark(self, item: QueueItem, status: str, *, error: str = "", lora: str = "") -> None:
        with self._lock:
            item.status, item.error, item.lora = status, error, lora
            self.save()

    def clear_finished(self) -> None:
        """Forget the items that are done, failed or cancelled."""
        with self._lock:
            self.items = [i for i in self.items if i.status in ("pending", "running")]
            self.save()


def saved_settings(models: ModelsDir, model: str) -> tuple[TrainingParams, list[Concept]]:
    """The Parameters and Concepts saved beside `model` (by its last training or "Save Settings").
    Raises ModelError for a missing model, ConfigError when it has no saved concepts."""
    folder = models.existing_model_dir(model)
    params = TrainingParams.load(folder / PARAMS_FILE) if (folder / PARAMS_FILE).is_file() else TrainingParams()
    if not (folder / CONCEPTS_FILE).is_file():
        raise ConfigError(f"{model}: no saved concepts ({folder / CONCEPTS_FILE}); set its Concepts and save them, "
                          "or give --concepts_list")
    return params, load_concepts(folder / CONCEPTS_FILE)


TrainFn = Callable[..., object]


def run_queue(models: ModelsDir, queue: TrainingQueue, *, train_fn: TrainFn | None = None, report: Report = no_report,
              cancel: CancelFlag | None = None, device: str | None = None,
              only: set[str] | None = None) -> list[QueueItem]:
    """Train every pending item in order (items added meanwhile included; with `only`, just the items of
    those ids); return the items this call ran.

    A failing item is recorded with its error and the next one starts. Cancel
    stops after the running item has saved what it learned.
    """
    if train_fn is None:
        from .train import train as train_fn
    ran = []
    while (waiting := [i for i in queue.pending() if only is None or i.id in only]) \
            and not (cancel is not None and cancel.is_set()):
        item = waiting[0]
        queue.mark(item, "running")
        ran.append(item)
        log.info("Queue: training %s (%d more waiting)", item.model, len(waiting) - 1)
        try:
            params = TrainingParams.from_dict(item.params, source=f"queue item {item.id}")
            concepts = [Concept.from_dict(c, source=f"queue item {item.id}") for c in item.concepts]
            result = train_fn(models, item.model, params, concepts, report=report, cancel=cancel, device=device)
        except Exception as e:  # noqa: BLE001 - any failure of one item is recorded; the queue goes on
            log.error("Queue: training %s failed: %s", item.model, e)
            queue.mark(item, "failed", error=f"{type(e).__name__}: {e}")
            continue
        lora = str(result.lora_path) if getattr(result, "lora_path", None) else ""
        queue.mark(item, "cancelled" if result.cancelled else "done", lora=lora)
        if result.cancelled:
            break
    return ran
