"""SHA-256 of checkpoints hashed before, so that a file is read for its hash once.

The hash of a 2 GB checkpoint takes about 2 s of one core (2.1 s here, with the
CPU's SHA instructions): more than Create Model's or a merge's own work on a
machine whose copy runs from the page cache. It is stored in
`<models>/lora_trainer/checkpoint_hashes.json` under the file's resolved path
with its size and modification time, as the web UI's cache.json keeps them;
a file whose size or time changed is hashed again. A cache that cannot be
read or written costs only the time: the hash is then computed.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from .fileio import atomic_write_text

log = logging.getLogger(__name__)

HASH_CACHE_FILE = "checkpoint_hashes.json"


class HashCache:
    """Checkpoint path -> {"size", "mtime_ns", "sha256"}, kept in one JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def get(self, file: Path) -> str | None:
        """The stored hash of `file`, or None when it is not stored or the file changed since."""
        entry = self._read().get(_key(file))
        stamp = file_stamp(file)
        if isinstance(entry, dict) and stamp is not None and entry.get("size") == stamp[0] \
                and entry.get("mtime_ns") == stamp[1] and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        return None

    def put(self, file: Path, digest: str, stamp: tuple[int, int] | None) -> None:
        """Store `digest` for `file` as it was when hashing began (`stamp`: size and time then)."""
        if stamp is None or stamp != file_stamp(file):  # changed while it was read: not stored
            return
        with self._lock:
            entries = self._read()
            entries[_key(file)] = {"size": stamp[0], "mtime_ns": stamp[1], "sha256": digest}
            try:
                atomic_write_text(self.path, json.dumps(entries, indent=1, sort_keys=True))
            except OSError as e:
                log.warning("%s: the checkpoint hash was not stored (%s); it is computed again next time", self.path, e)

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


def _key(file: Path) -> str:
    return str(Path(file).resolve())


def file_stamp(file: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of `file`, None when it cannot be looked at."""
    try:
        stat = Path(file).stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns
