"""The training queue: several trainings run one after another, unattended.

Each item is a model with the settings it is to train with (Parameters and
Concepts as dicts, frozen when it was added). The queue lives in
`<models>/lora_trainer/queue.json`, rewritten atomically at every change, so it
survives a restart of the app. Every operation reads the file afresh and
changes only its own item, so the tab's Add to Queue while the queue runs, a
second page and the command line all see and keep each other's items. A
running item names its process; one whose process is gone (the app stopped)
reads as "pending" again (training continues from its last save). `run_queue`
takes the pending items in order; an item that fails is marked "failed" with
its error and the next one starts; a Cancel stops the queue after saving the
running item, which stays "cancelled".
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .config import CONCEPTS_FILE, PARAMS_FILE, Concept, TrainingParams, load_concepts
from .errors import ConfigError
from .fileio import atomic_write_text
from .host import ModelsDir
from .modellock import owner_alive, this_process
from .progress import CancelFlag, Report, no_report

try:  # one process at a time changes the file (the app and a command line); absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - Windows: the threads of one process are still serialised
    fcntl = None

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.json"
STATUSES = ("pending", "running", "done", "failed", "cancelled")
_process_locks: dict[str, threading.RLock] = {}  # queue file -> the lock every TrainingQueue of it shares
_process_locks_guard = threading.Lock()


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
    runner: dict = field(default_factory=dict)  # the process training it while "running" (modellock.this_process)

    def describe(self) -> str:
        tail = f": {self.error}" if self.error else (f": {self.lora}" if self.lora else "")
        return f"{self.model} [{self.status}]{tail}"


class TrainingQueue:
    """The items of `path` (a JSON list). Every call reads the file and writes its change back at once,
    under a lock shared by the threads of this process and (where the system has `fcntl`) other processes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with _process_locks_guard:
            self._lock = _process_locks.setdefault(str(self.path.resolve()), threading.RLock())
        self.items  # noqa: B018 - a broken file is refused when the queue is opened

    @classmethod
    def at(cls, models: ModelsDir) -> "TrainingQueue":
        return cls(models.working / QUEUE_FILE)

    @property
    def items(self) -> list[QueueItem]:
        """What the file holds now. Raises ConfigError naming the file when it is not a queue."""
        with self._exclusive():
            return self._read()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            if fcntl is None or not self.path.parent.is_dir():
                yield
                return
            with open(self.path.with_name(f".{self.path.name}.lock"), "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

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
            if item.status == "running" and not owner_alive(item.runner):
                # its process stopped while it trained: it continues from its last save when run again
                item.status, item.runner = "pending", {}
        return items

    def _write(self, items: list[QueueItem]) -> None:
        atomic_write_text(self.path, json.dumps([asdict(i) for i in items], indent=2) + "\n")

    def add(self, model: str, params: TrainingParams, concepts: list[Concept]) -> QueueItem:
        """Append a training of `model` with these settings; returns the item."""
        item = QueueItem(model, params.to_dict(), [c.to_dict() for c in concepts])
        with self._exclusive():
            items = self._read()
            self._write(items + [item])
        log.info("Queued training of %s (%d waiting)", model, sum(i.status == "pending" for i in items) + 1)
        return item

    def pending(self) -> list[QueueItem]:
        return [i for i in self.items if i.status == "pending"]

    def claim(self, item: QueueItem) -> bool:
        """Mark `item` "running" for this process if it is still pending (no other runner took it)."""
        with self._exclusive():
            items = self._read()
            stored = next((i for i in items if i.id == item.id), None)
            if stored is None or stored.status != "pending":
                return False
            stored.status, stored.runner = "running", this_process()
            self._write(items)
        item.status, item.runner = stored.status, stored.runner
        return True

    def mark(self, item: QueueItem, status: str, *, error: str = "", lora: str = "") -> None:
        """Set `item`'s status (and error or LoRA); an item no longer in the file is put back at its end."""
        runner = this_process() if status == "running" else {}
        with self._exclusive():
            items = self._read()
            stored = next((i for i in items if i.id == item.id), None)
            if stored is None:
                items.append(item)
                stored = item
            stored.status, stored.error, stored.lora, stored.runner = status, error, lora, runner
            self._write(items)
        item.status, item.error, item.lora, item.runner = status, error, lora, runner

    def clear_finished(self) -> int:
        """Forget the items that are done, failed or cancelled; returns how many were removed."""
        with self._exclusive():
            items = self._read()
            kept = [i for i in items if i.status in ("pending", "running")]
            self._write(kept)
        return len(items) - len(kept)


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
        if not queue.claim(item):  # another runner (the command line, another page's job) took it meanwhile
            continue
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
