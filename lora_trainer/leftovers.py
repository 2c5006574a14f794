"""What a process killed in the middle of a write leaves, cleaned up by the next command.

The atomic writers (fileio.py) name their temporaries `.NAME.PID.XXXXXXXX.tmp`
and the folder an overwrite moves aside `.NAME.old-PID`, PID being the
writer's process. A final name never holds a partial file, but a kill -9 (or a
power cut) leaves these behind. The next command removes the temporaries of
processes that are gone (an unfinished Create Model is one: it is removed with
a line saying to create the model again) and puts a folder moved aside back
when the kill came between the two renames of an overwrite. Those of running
processes (another job writing beside it) are left alone.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
_MOVED_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def clean_leftovers(folder: Path, *, what: str = "") -> list[str]:
    """Remove the temporaries of dead writers in `folder` (not below it) and restore folders an
    interrupted overwrite moved aside; return the names handled. `what` names a folder's
    temporaries in the line (e.g. "Create Model")."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    handled = []
    for entry in entries:
        temporary, aside = _TEMPORARY.match(entry.name), _MOVED_ASIDE.match(entry.name)
        match = temporary or aside
        if match is None or process_running(int(match["pid"])):
            continue
        final = folder / match["name"]
        if aside and not final.exists():
            os.replace(entry, final)
            log.warning("Put %s back: process %s stopped while replacing it", final, match["pid"])
        else:
            _remove(entry)
            kind = f"unfinished {what} of '{match['name']}'" if what and temporary else f"leftover {entry.name}"
            advice = "; create it again" if what and temporary and not final.exists() else ""
            log.warning("Removed the %s in %s: process %s stopped while writing it%s", kind, folder, match["pid"],
                        advice)
        handled.append(entry.name)
    return handled


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (this one does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
