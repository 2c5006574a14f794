"""One writer per model: a lock file in the model folder names the job that holds it and its process.

Training, class-picture generation and Generate Ckpt of a model take
`<model>/lock.json`; a second job on the same model, from this process or
another (the tab and the command line, two commands), is refused with a line
naming the running job and its process id. A lock whose process is gone (a
kill -9, a crash, a power cut) is taken over, with a warning saying so.
Different models have different lock files and run side by side.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from .errors import LoraTrainerError
from .leftovers import process_running

log = logging.getLogger(__name__)

LOCK_FILE = "lock.json"
_held: dict[str, int] = {}     # lock path -> thread holding it in this process (nested jobs of that thread pass)
_held_guard = threading.Lock()


class ModelBusy(LoraTrainerError):
    """Another job is writing the model."""


def model_lock(model_dir: Path, job: str) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of `model_dir` for `job` ("train", "class images", "merge") while the block runs.

    Raises ModelBusy naming the running job and its process when another job holds it. The lock is
    re-entrant for the thread holding it (training generates its class pictures under its own lock).
    Processes launched as ranks > 0 by accelerate or torchrun do not lock: their rank 0 holds it.
    """
    if int(os.environ.get("RANK", "0") or 0) > 0:
        return contextlib.nullcontext()
    return _locked(Path(model_dir), job)


@contextlib.contextmanager
def _locked(model_dir: Path, job: str) -> Iterator[None]:
    path = model_dir / LOCK_FILE
    key, me = str(path.resolve()), threading.get_ident()
    with _held_guard:
        if _held.get(key) == me:
            nested = True
        else:
            nested = False
    if nested:
        yield
        return
    record = _acquire(path, job)
    with _held_guard:
        _held[key] = me
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        _release(path, record)


def check_not_busy(model_dir: Path, job: str) -> None:
    """Refuse `job` (e.g. overwriting the model) while another job holds the model's lock. Raises ModelBusy."""
    path = Path(model_dir) / LOCK_FILE
    holder = _read(path)
    if holder is not None and _alive(holder):
        raise ModelBusy(_busy_message(model_dir, job, holder))


def this_process() -> dict:
    """This process as a lock names it: pid, host and start (telling a reused pid apart)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid())}


def owner_alive(record: dict) -> bool:
    """Whether the process `record` (`this_process()` of some process) names still runs."""
    return _alive(record)


def _acquire(path: Path, job: str) -> dict:
    record = {"job": job, **this_process(), "started": time.time()}
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # being written this very moment, or left empty by a kill: look again shortly
                time.sleep(0.05)
                holder = _read(path) or {}
            if holder and _alive(holder):
                raise ModelBusy(_busy_message(path.parent, job, holder)) from None
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return record
    raise ModelBusy(f"{path}: cannot take the model's lock (it keeps changing); try again")


def _take_over(path: Path, holder: dict) -> None:
    """Remove a lock whose process is gone; a lock another process took meanwhile is put back."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    moved = _read(aside) or {}
    if moved and moved != holder and _alive(moved):  # not the stale one we saw: give it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        log.warning("Taking over the lock of %s: its %s job (process %s) is no longer running",
                    path.parent.name, holder.get("job", "unknown"), holder.get("pid", "unknown"))
    aside.unlink(missing_ok=True)


def _release(path: Path, record: dict) -> None:
    holder = _read(path)
    if holder is not None and holder.get("pid") == record["pid"] and holder.get("started") == record["started"]:
        path.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(holder: dict) -> bool:
    """Whether the process of a lock still runs (same host, same pid and, where the system says, same start)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process (a shared folder): it cannot be looked at, so it counts as running
    if not process_running(pid):
        return False
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)  # a reused pid is another process


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), telling a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _busy_message(model_dir: Path, job: str, holder: dict) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(holder["started"])) if isinstance(holder.get("started"), (int, float)) else "?"
    return (f"{Path(model_dir).name}: the {job} is refused: the model is in use by a {holder.get('job', 'job')} job "
            f"(process {holder.get('pid')}, since {since}); wait for it to finish or cancel it")
