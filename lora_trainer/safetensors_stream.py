"""Writing a `.safetensors` file one tensor at a time.

`safetensors.torch.save_file` turns every tensor into bytes before writing,
so saving a checkpoint needs twice its size in memory. The format is simple
(an 8-byte header length, a JSON header with each tensor's dtype, shape and
byte range, then the raw little-endian data), so when the shapes and dtypes
are known beforehand the tensors can be written as they are produced and
dropped: peak memory is one tensor, not two checkpoints. The file is written
under a temporary name and renamed at the end (fileio.atomic_path).

A tensor read from a `.safetensors` file and written unchanged (most of a converted
or merged checkpoint) is copied file to file by the kernel (`os.copy_file_range`),
as a plain copy of the file is, instead of through the memory map: safetensors
maps each file it opens once, so such a tensor's address says where its bytes lie
in the file (`mapped_file` records that for the files our readers open).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from .errors import CheckpointError
from .fileio import atomic_path

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]
DEFERRED_WIDTH = 64  # a SHA-256 in hex
DEFERRED_PLACEHOLDER = "?" * DEFERRED_WIDTH
# Bytes per write() call. One call per tensor (up to 100 MB) took 1.3-2.7 s for a 2 GB checkpoint on
# ext4 where 1 MB pieces took 0.62-0.70 s, about what a plain copy of the file takes (0.8 s).
WRITE_PIECE = 1 << 20
PAGE = 4096


def read_layout(path: str | Path) -> Layout:
    """Key -> (dtype, shape) of every tensor of a `.safetensors` file, from its header alone, in the order
    their data lies in the file (the library's writer lists them by name, but lays them out by dtype first).

    Raises CheckpointError for a file that is not a readable safetensors file.
    """
    path = Path(path)
    try:
        _, header = _read_header(path)
        keys = sorted((key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"])
        return {key: (DTYPES[header[key]["dtype"]], tuple(header[key]["shape"])) for key in keys}
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors header ({type(e).__name__}: {e})") from None


def data_section_start(path: str | Path) -> int:
    """Where the data section of a `.safetensors` file starts (after its 8-byte length and JSON header)."""
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[int, dict]:
    """(where the data section starts, the parsed JSON header) of a `.safetensors` file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


# Files whose tensors are views of one memory map: id -> (first address, last address + 1, the file opened
# when recorded, two of its tensors). Holding the tensors keeps the map, so its addresses cannot be reused
# while recorded; the file is opened then, so that a file put in its place later is not the one read.
_MAPPED: dict[int, tuple[int, int, int, list]] = {}
_MAPPED_LOCK = threading.Lock()


@contextlib.contextmanager
def mapped_file(path: str | Path, tensors: Mapping[str, "torch.Tensor"]) -> Iterator[None]:
    """While inside, tensors of `path` (a `.safetensors` file, as safetensors' readers give them:
    `tensors` maps some of its keys to them) are written by copying file to file.

    Recorded only when two of them lie exactly where the file's header says, relative to one address
    (one memory map of the whole file); otherwise, or when the header cannot be read, nothing is
    recorded and they are written from memory as any tensor. The caller keeps the file's tensors
    unchanged while inside (a tensor changed in place would differ from the file).
    """
    entry = _mapping(path, tensors) if hasattr(os, "copy_file_range") else None
    if entry is None:
        yield
        return
    with _MAPPED_LOCK:
        _MAPPED[id(entry)] = entry
    try:
        yield
    finally:
        with _MAPPED_LOCK:
            del _MAPPED[id(entry)]
        os.close(entry[2])


def _mapping(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, int, list] | None:
    """The `_MAPPED` entry of `path`, its file opened now; None (nothing left open) when `tensors` do not
    lie in one map of it or it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        start, header = _read_header(Path(path))
        size = os.fstat(fd).st_size
        keys = [k for k in tensors if k in header and header[k]["data_offsets"][1] > header[k]["data_offsets"][0]]
        if keys and size == Path(path).stat().st_size:
            ends = [tensors[k].data_ptr() - start - header[k]["data_offsets"][0] for k in (keys[0], keys[-1])]
            if ends[0] == ends[1]:
                return ends[0], ends[0] + size, fd, [tensors[keys[0]], tensors[keys[-1]]]
    except (OSError, struct.error, ValueError, KeyError, TypeError):
        pass
    os.close(fd)
    return None


def file_span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(open file, offset) where `tensor`'s bytes lie in a file recorded by `mapped_file`, else None."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size()
    with _MAPPED_LOCK:
        for low, high, fd, _ in _MAPPED.values():
            if low <= first and last <= high:
                return fd, first - low
    return None


def encode_header(layout: Layout, metadata: dict[str, str] | None = None, *, data_start: int | None = None) -> bytes:
    """The JSON header `write_safetensors` writes after the 8-byte length, padded with spaces so that the
    data starts 8-byte aligned (as safetensors pads it) and, with `data_start` (a multiple of 8), at that
    offset within a PAGE."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, (dtype, shape) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    padding = ((data_start or 0) - 8 - len(blob)) % (8 if data_start is None else PAGE)
    return blob + b" " * padding


def in_file_order(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int | None]:
    """`tensors` with those that will be copied from a recorded file (`file_span`) first, in that file's
    order, and where in a PAGE the data section should start (`encode_header`'s `data_start`; None when
    none is copied).

    The kernel copies bytes fastest between the same offsets within a page (a 2 GB checkpoint: 0.77 s,
    against 0.97-1.06 s between different ones): tensors kept in their file's order keep their distances,
    and the start chosen puts most of their bytes at their own file's offsets within a page.
    """
    spans = {key: file_span(tensor) for key, tensor in tensors.items()}
    copied = sorted((key for key in tensors if spans[key] is not None), key=lambda key: spans[key])
    ordered = {**{key: tensors[key] for key in copied}, **{k: t for k, t in tensors.items() if spans[k] is None}}
    bytes_at: dict[int, int] = {}
    offset = 0
    for key, tensor in ordered.items():
        size = tensor.numel() * tensor.element_size()
        if spans[key] is not None and (spans[key][1] - offset) % 8 == 0:
            start = (spans[key][1] - offset) % PAGE
            bytes_at[start] = bytes_at.get(start, 0) + size
        offset += size
    return ordered, max(bytes_at, key=bytes_at.get, default=None)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of one tensor as the data section holds them."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def write_in_pieces(f, data: memoryview) -> None:
    """`f.write(data)` in WRITE_PIECE-sized calls."""
    for start in range(0, len(data), WRITE_PIECE):
        _write_all(f, data[start:start + WRITE_PIECE])


def _write_all(f, data) -> None:
    """All of `data` to `f`, an unbuffered file whose write() may take only a part."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


class _TensorWriter:
    """Writes tensors one after the other to an unbuffered file: copied from their file when `file_span`
    knows it and the kernel can (`os.copy_file_range`), else from memory in WRITE_PIECE pieces."""

    def __init__(self, f):
        self.f = f
        self.can_copy = True

    def write(self, tensor: torch.Tensor) -> None:
        span = file_span(tensor) if self.can_copy else None
        if span is None or not self._copy(span, tensor.numel() * tensor.element_size()):
            write_in_pieces(self.f, tensor_bytes(tensor))

    def _copy(self, span: tuple[int, int], size: int) -> bool:
        """Copy `size` bytes from the span's file; False (nothing written) where the kernel cannot."""
        source, offset = span
        done = 0
        try:
            while done < size:
                copied = os.copy_file_range(source, self.f.fileno(), size - done, offset + done)
                if copied == 0:
                    raise OSError(errno.EIO, "a source file is shorter than its header says")
                done += copied
        except OSError as e:
            if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise  # a full disk, a changed source: as a failed write
            self.can_copy = False  # e.g. across file systems on an old kernel: from memory from now on
            return False
        return True


def write_safetensors(path: str | Path, layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]], *,
                      metadata: dict[str, str] | None = None, overwrite: bool = False,
                      deferred: dict[str, Callable[[], str]] | None = None, data_start: int | None = None) -> Path:
    """Write `tensors` (key, tensor) in the order and with the dtypes and shapes of `layout`.

    `data_start`: where in a PAGE the data section starts (`encode_header`), e.g. where the file that most
    tensors are copied from has its own, so that the kernel copies them between like offsets.

    `deferred`: metadata entries known only once the tensors are written (a hash computed meanwhile):
    each value is called then and must be DEFERRED_WIDTH ASCII characters (a SHA-256 in hex); the
    header is written with a placeholder of that width and patched in place.
    Raises FileExistsError when `path` exists and `overwrite` is False, and
    ValueError when a tensor does not match its layout entry or a deferred value has
    another width (a bug in the caller); either way nothing is left under `path`.
    """
    deferred = deferred or {}
    metadata = {**(metadata or {}), **{key: DEFERRED_PLACEHOLDER for key in deferred}} or None
    blob = encode_header(layout, metadata, data_start=data_start)
    path = Path(path)
    need = 8 + len(blob) + sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout.values())
    # "r+b", not "wb": the temporary file is new and empty, and on ext4 truncating it (which "wb" does even
    # to an empty file) marks it to be flushed to disk on close, which made the close wait seconds.
    with atomic_path(path, overwrite=overwrite, need=need) as tmp, open(tmp, "r+b", buffering=0) as f:
        writer = _TensorWriter(f)
        _write_all(f, struct.pack("<Q", len(blob)) + blob)
        expected = iter(layout.items())
        for key, tensor in tensors:
            want_key, (dtype, shape) = next(expected, (None, (None, None)))
            if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{path.name}: tensor {key} ({tensor.dtype}, {tuple(tensor.shape)}) does not match "
                                 f"the layout entry {want_key} ({dtype}, {shape})")
            writer.write(tensor)
        left = next(expected, None)
        if left is not None:
            raise ValueError(f"{path.name}: tensor {left[0]} of the layout was never written")
        for key, value in deferred.items():
            _patch_metadata(f, blob, key, value())
    return path


def _patch_metadata(f, blob: bytes, key: str, value: str) -> None:
    """Put `value` where the header holds the placeholder of the metadata entry `key`."""
    data = value.encode("ascii", "replace")
    if len(data) != DEFERRED_WIDTH or b'"' in data or b"\\" in data:
        raise ValueError(f"deferred metadata {key!r}: {value!r} is not {DEFERRED_WIDTH} plain characters")
    entry = json.dumps({key: DEFERRED_PLACEHOLDER}, separators=(",", ":"))[1:-1].encode("utf-8")
    f.seek(8 + blob.index(entry) + len(entry) - DEFERRED_WIDTH - 1)
    _write_all(f, data)
    f.seek(0, 2)
