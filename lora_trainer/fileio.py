"""Writing files so that a failure never leaves a partial file under the final name.

Everything is written to a temporary name in the same folder and renamed into
place at the end; a failure removes the temporary and leaves what the user had.
Temporaries carry the writer's process id (`.NAME.PID.XXXX.tmp`), so that what
a killed process left is recognised and cleaned by the next command (leftovers.py).
A full disk (or quota) becomes one DiskFullError line naming the folder, the
space the write needed and what is free.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DiskFullError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the quota, or the file-size limit) is full; also the libraries'
    own errors for it (safetensors, torch.save) that are not OSError."""
    if isinstance(error, DiskFullError) or isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return True
    return any(text in str(error) for text in ("No space left on device", "Disk quota exceeded", "File too large"))


def disk_full(folder: Path, what: str, *, need: int | None, written: int) -> DiskFullError:
    """The one line of a write that ran out of space in `folder`."""
    try:
        free = _size(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    needs = f"needs {_size(need)}" if need else f"needs more than the {_size(written)} written"
    return DiskFullError(f"{folder}: the disk is full: {what} {needs} and {free} is free; free some space there "
                         "(or choose another folder) and run again; nothing already there was changed")


def _size(size: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


@contextlib.contextmanager
def atomic_path(final: Path, *, overwrite: bool = True, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` on success.

    `need`: the bytes the file will have, for the message of a full disk.
    Raises FileExistsError when `final` exists and `overwrite` is False, DiskFullError
    when the disk is full.
    """
    final = Path(final)
    tmp_path = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not overwrite and final.exists():
            raise FileExistsError(f"{final} already exists")
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        yield tmp_path
        if not overwrite and final.exists():
            raise FileExistsError(f"{final} already exists")
        os.replace(tmp_path, final)
    except Exception as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        written = tmp_path.stat().st_size if tmp_path is not None and tmp_path.exists() else 0
        raise disk_full(final.parent, f"writing {final.name}", need=need, written=written) from None
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(final: Path, text: str) -> None:
    """Write `text` as UTF-8 atomically. Raises DiskFullError when the disk is full."""
    data = text.encode("utf-8")
    with atomic_path(final, need=len(data)) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False, need: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; it becomes `final` on success.

    With `overwrite`, an existing `final` is replaced only once the new one is
    complete, so a failure keeps the old folder as it was. `need`: about the
    bytes the folder will hold, for the message of a full disk.
    Raises FileExistsError when `final` exists and `overwrite` is False, DiskFullError
    when the disk is full.
    """
    final = Path(final)
    tmp = old = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} already exists")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    except Exception as e:
        if not is_disk_full(e):  # a file inside gave its own DiskFullError: name this folder instead of the temporary
            raise
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp is not None else 0
        raise disk_full(final.parent, f"writing the folder {final.name}", need=need, written=written) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
