"""Writing files so that a failure never leaves a partial file under the final name.

Everything is written to a temporary name in the same folder and renamed into
place at the end; a failure removes the temporary and leaves what the user had.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` on success.

    Raises FileExistsError when `final` exists and `overwrite` is False.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and final.exists():
        raise FileExistsError(f"{final} already exists")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
        if not overwrite and final.exists():
            raise FileExistsError(f"{final} already exists")
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; it becomes `final` on success.

    With `overwrite`, an existing `final` is replaced only once the new one is
    complete, so a failure keeps the old folder as it was.
    Raises FileExistsError when `final` exists and `overwrite` is False.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
