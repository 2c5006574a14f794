"""Files whose writes a test watches: the disk-full writer (test_diskfull.py) and the kill -9 child
(helpers_kill.py) replace `open` with `watching_open` and `os.copy_file_range` (how unchanged tensors
are copied file to file) with `watching_copy_file_range`, and decide at each write what happens."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

BeforeWrite = Callable[[object, object, int], None]   # (the real file, the data, its size in bytes)


def nbytes(data) -> int:
    return len(data.encode("utf-8")) if isinstance(data, str) else memoryview(data).nbytes


def write_part(file, data, size: int) -> None:
    """Write the first `size` bytes of `data` (bytes-like only) and flush: a file that ends early."""
    if size > 0 and not isinstance(data, str):
        file.write(memoryview(data).cast("B")[:size])
        file.flush()


class WatchedFile:
    """A file whose every write first goes through `before_write` (which may raise, or kill the process)."""

    def __init__(self, file, before_write: BeforeWrite):
        self._file, self._before = file, before_write

    def write(self, data):
        self._before(self._file, data, nbytes(data))
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __iter__(self):
        return iter(self._file)


def watching_open(real_open, folders: list[Path], before_write: BeforeWrite):
    """An `open` that watches the files opened for writing under `folders`."""
    inside = [str(Path(f).resolve()) + os.sep for f in folders]

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wax+") and isinstance(file, (str, os.PathLike)):
            path = str(Path(file).resolve())
            if any(path.startswith(folder) for folder in inside):
                return WatchedFile(handle, before_write)
        return handle

    return open_


class _Descriptor:
    """The target of one `os.copy_file_range` call, as the file `before_write` is given."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        return os.write(self.fd, data)

    def flush(self) -> None:
        pass


def watching_copy_file_range(real_copy, folders: list[Path], before_write: BeforeWrite):
    """An `os.copy_file_range` whose copies into files under `folders` first go through `before_write`,
    given the bytes the copy would write (as a write of them would be)."""
    inside = [str(Path(f).resolve()) + os.sep for f in folders]

    def copy_file_range(src: int, dst: int, count: int, offset_src=None, offset_dst=None) -> int:
        if any(os.readlink(f"/proc/self/fd/{dst}").startswith(folder) for folder in inside):
            start = os.lseek(src, 0, os.SEEK_CUR) if offset_src is None else offset_src
            data = os.pread(src, count, start)
            before_write(_Descriptor(dst), data, len(data))
        return real_copy(src, dst, count, offset_src, offset_dst)

    return copy_file_range
