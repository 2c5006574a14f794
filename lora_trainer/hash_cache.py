"""SHA-256 of checkpoints hashed before, so that a file is read for its hash once.

The hash of a 2 GB checkpoint takes about 2 s of one core (2.1 s here, with the
CPU's SHA instructions): more than Create Model's or a merge's own work on a
machine whose copy runs from the page cache. It is stored in
`<models>/lora_trainer/checkpoint_hashes.json` under the file's resolved path
with its size and modification time, as the web UI's cache.json keeps them;
a file whose size or time changed is hashed again. A cache that cannot be
read or written costs only the time: the hash is then computed. Inside the web
UI, a checkpoint it has loaded already has its hash in the web UI's own cache
(`modules.hashes`, checked against the file's time): that one is used too.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Callable

from .fileio import atomic_write_text

log = logging.getLogger(__name__)

HASH_CACHE_FILE = "checkpoint_hashes.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HashCache:
    """Checkpoint path -> {"size", "mtime_ns", "sha256"}, kept in one JSON file."""

    def __init__(self, path: Path, host: Callable[[Path], str | None] | None = None):
        self.path = Path(path)
        self.host = host  # the hash the host already knows (the web UI's own cache), asked second
        self._lock = threading.Lock()

    def get(self, file: Path) -> str | None:
        """The stored hash of `file`, else the host's, or None when neither knows the file as it is now."""
        entry = self._read().get(_key(file))
        stamp = file_stamp(file)
        if isinstance(entry, dict) and stamp is not None and entry.get("size") == stamp[0] \
                and entry.get("mtime_ns") == stamp[1] and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        return self._from_host(file)

    def _from_host(self, file: Path) -> str | None:
        if self.host is None:
            return None
        try:
            digest = self.host(Path(file))
        except Exception as e:  # the host's own code: its failure costs only the time of hashing
            log.debug("The host's hash of %s could not be read (%s: %s)", file, type(e).__name__, e)
            return None
        return digest if isinstance(digest, str) and _SHA256.fullmatch(digest) else None

    def put(self, file: Path, digest: str, stamp: tuple[int, int] | None) -> None:
        """Store `digest` for `file` as it was when hashing began (`stamp`: size and time then)."""
        if stamp is None or stamp != file_stamp(file):  # changed while it was read: not stored
            return
        with self._lock:
            # Checkpoints deleted since are forgotten, so the file holds no more than the folders do.
            entries = {key: entry for key, entry in self._read().items() if Path(key).exists()}
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
