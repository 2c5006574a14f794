"""One background job at a time: training, class pictures, Create Model, Generate Ckpt.

The UI starts a job with `JobRunner.start` and returns at once; the job runs in
a thread and reports `Progress` objects, which the runner keeps (the last one,
the losses, the sample pictures and a log that also collects the package's
`logging` lines) for the UI to poll. A second job is refused with a message
naming the running one. Cancel sets an Event the job checks; the host's own
Interrupt button counts as Cancel too. Jobs that need the GPU run inside
`hosts.gpu_lent_to_job`, so the host's model is moved off the GPU and brought
back afterwards, also after an error. After a job that wrote a checkpoint or a
LoRA the host is told to refresh its lists.

No gradio here: the UI only reads `JobRunner.snapshot()`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import LoraTrainerError
from .hosts import Host, gpu_lent_to_job
from .progress import Progress, Report, TrainResult

log = logging.getLogger(__name__)

# What each kind of job needs from the host, besides running.
GPU_JOBS = ("train", "class images")
WRITES_CHECKPOINTS = ("merge",)
WRITES_LORAS = ("train",)
MAX_LOG_LINES = 1000

JobFn = Callable[[Report, "CancelSignal"], Any]


class JobBusy(LoraTrainerError):
    """A job is running already; the message names it."""


class CancelSignal:
    """What a job checks to stop: our Cancel button or the host's Interrupt."""

    def __init__(self, host: Host):
        self.host = host
        self.event = threading.Event()

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        if not self.event.is_set() and self.host.interrupted():
            log.info("Interrupted from the host; stopping the job")
            self.event.set()
        return self.event.is_set()


@dataclass
class JobState:
    """A copy of what the runner knows, for one poll of the UI."""

    name: str = ""                      # e.g. "train 'my-model'"
    kind: str = ""                      # "train", "class images", "create", "merge"
    running: bool = False
    cancelling: bool = False
    progress: Progress = field(default_factory=Progress)
    log: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    result: Any = None
    error: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    notes: list[str] = field(default_factory=list)  # lines the outcome carries (`Progress.note`)
    finished_jobs: int = 0              # goes up by one whenever a job ends
    version: int = 0                    # goes up with every change

    @property
    def status(self) -> str:
        """One line for the status bar."""
        if not self.name:
            return "Ready."
        if self.running:
            what = self.progress.message or "working"
            return f"{'Cancelling' if self.cancelling else 'Running'} {self.name}: {what}"
        if self.error:
            return f"{self.name} failed: {self.error}"
        return f"{self.name} {'cancelled' if self.cancelled else 'finished'}: {self.outcome}".rstrip(": ")

    @property
    def cancelled(self) -> bool:
        return (isinstance(self.result, TrainResult) and self.result.cancelled) or self.cancelling

    @property
    def outcome(self) -> str:
        """What the ended job made, in a few words, with the job's notes."""
        return "; ".join([self._made(), *self.notes]).strip("; ")

    def _made(self) -> str:
        r = self.result
        if isinstance(r, TrainResult):
            made = f"; LoRA {Path(r.lora_path).name}" if r.lora_path else ""
            return f"{r.steps} steps, total lifetime steps {r.lifetime_steps}{made}"
        if isinstance(r, Path):
            return f"wrote {r}"
        if isinstance(r, list) and all(isinstance(n, int) for n in r):
            return f"{sum(r)} class images generated"
        return self.progress.message


def _shape(message: str) -> str:
    return re.sub(r"\d+", "#", message)


class _LogCollector(logging.Handler):
    def __init__(self, runner: "JobRunner"):
        super().__init__(logging.INFO)
        self.runner = runner
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.runner.add_log(self.format(record))
        except Exception:  # a log line must never break the job
            self.handleError(record)


class JobRunner:
    """Runs at most one job at a time in a background thread."""

    def __init__(self, host: Host, *, logger_name: str = "lora_trainer"):
        self.host = host
        self.logger_name = logger_name
        self._lock = threading.RLock()
        self._state = JobState()
        self._cancel: Optional[CancelSignal] = None
        self._thread: Optional[threading.Thread] = None

    # -- starting and stopping -------------------------------------------------
    def start(self, kind: str, name: str, fn: JobFn, *, on_done: Callable[[Any], None] | None = None) -> None:
        """Run `fn(report, cancel)` in the background as job `name` of `kind`.

        `on_done(result)` runs in the job's thread after a successful job, before
        the host is told about new files. Raises JobBusy naming the running job.
        """
        with self._lock:
            if self._state.running:
                raise JobBusy(f"A job is running: {self._state.name}. Wait for it to finish or press Cancel.")
            finished = self._state.finished_jobs
            self._state = JobState(name=name, kind=kind, running=True, started=time.time(),
                                   progress=Progress(job=kind, message="Starting"), finished_jobs=finished,
                                   version=self._state.version + 1)
            self._cancel = CancelSignal(self.host)
            self.host.clear_interrupt()
            self._thread = threading.Thread(target=self._run, args=(kind, fn, self._cancel, on_done),
                                            name=f"lora_trainer {kind}", daemon=True)
            self._thread.start()

    def cancel(self) -> bool:
        """Ask the running job to stop; False when nothing runs."""
        with self._lock:
            if not self._state.running or self._cancel is None:
                return False
            self._cancel.set()
            self._state.cancelling = True
            self._state.version += 1
        log.info("Cancel requested for %s", self._state.name)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running job; True when none runs any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    @property
    def running(self) -> bool:
        return self._state.running

    def snapshot(self) -> JobState:
        with self._lock:
            s = self._state
            return dataclasses.replace(s, progress=dataclasses.replace(s.progress), log=list(s.log), notes=list(s.notes),
                                       losses=list(s.losses), samples=list(s.samples))

    # -- what the job reports --------------------------------------------------
    def report(self, progress: Progress) -> None:
        with self._lock:
            s = self._state
            if progress.message and _shape(progress.message) != _shape(s.progress.message):
                self._append_log(progress.message)  # "Training step 5/500" is not logged after "... 4/500"
            if progress.loss is not None and (not s.losses or s.losses[-1][0] != progress.step):
                s.losses.append((progress.step, float(progress.loss)))
            for sample in progress.samples:
                if Path(sample) not in s.samples:
                    s.samples.append(Path(sample))
            if progress.note and progress.note not in s.notes:
                s.notes.append(progress.note)
                self._append_log(progress.note)
            s.progress = dataclasses.replace(progress, samples=list(progress.samples))
            s.version += 1

    def add_log(self, line: str) -> None:
        with self._lock:
            self._append_log(line)
            self._state.version += 1

    def _append_log(self, line: str) -> None:
        lines = self._state.log
        lines.extend(line.splitlines() or [""])
        del lines[:-MAX_LOG_LINES]

    # -- the job's thread -------------------------------------------------------
    def _run(self, kind: str, fn: JobFn, cancel: CancelSignal, on_done) -> None:
        handler = _LogCollector(self)
        logger = logging.getLogger(self.logger_name)
        old_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the console lines users look for are INFO
        logger.addHandler(handler)
        result, error = None, None
        try:
            result = self._call(kind, fn, cancel)
            if on_done is not None:
                on_done(result)
        except LoraTrainerError as e:
            error = str(e)
        except FileExistsError as e:
            error = f"{e}"
        except Exception as e:  # a bug: keep the traceback in the log
            error = f"{type(e).__name__}: {e}"
            self.add_log(traceback.format_exc())
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        if error:
            log.error("%s failed: %s", self._state.name, error)
            self.add_log(f"Error: {error}")
        self._tell_host(kind, failed=error is not None)
        with self._lock:
            s = self._state
            s.running, s.result, s.error, s.finished = False, result, error, time.time()
            if isinstance(result, TrainResult):
                s.losses = s.losses or list(enumerate(result.losses, 1))
                s.samples += [Path(p) for p in result.samples if Path(p) not in s.samples]
            s.finished_jobs += 1
            s.version += 1

    def _call(self, kind: str, fn: JobFn, cancel: CancelSignal) -> Any:
        if kind in GPU_JOBS:
            with gpu_lent_to_job(self.host):
                return fn(self.report, cancel)
        return fn(self.report, cancel)

    def _tell_host(self, kind: str, *, failed: bool) -> None:
        # Training may have written a LoRA before it failed or was cancelled: refresh anyway.
        try:
            if kind in WRITES_LORAS:
                self.host.loras_changed()
            if kind in WRITES_CHECKPOINTS and not failed:
                self.host.checkpoints_changed()
        except Exception as e:  # the host's refresh failing must not hide the job's outcome
            log.warning("Could not refresh the host's lists: %s", e)
            self.add_log(f"Warning: could not refresh the host's lists: {e}")


_process_runner: Optional[JobRunner] = None
_process_lock = threading.Lock()


def process_runner(host: Host) -> JobRunner:
    """The one runner of this process, so a rebuilt tab (the web UI's "Reload UI") still sees a running job
    and cannot start a second one. While nothing runs, it takes the newest `host`.
    """
    global _process_runner
    with _process_lock:
        if _process_runner is None:
            _process_runner = JobRunner(host)
        elif not _process_runner.running:
            _process_runner.host = host
        return _process_runner
