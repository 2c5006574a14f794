"""Reading and writing original-layout checkpoint files, safely.

`.safetensors` is read lazily, one tensor at a time. `.ckpt` is a pickle: it is
loaded with PyTorch's weights-only unpickler (memory-mapped where the file
allows), so a pickle that asks to run code is refused and nothing it asks for
runs. The few harmless objects real Stable Diffusion `.ckpt` files carry
beside the weights (a Lightning callback record, numpy scalars) are read as
inert placeholders.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import pickletools
import re
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import CheckpointError
from .fileio import atomic_path
from .hash_cache import HashCache, file_stamp
from .safetensors_stream import mapped_file

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "ckpt")


class _InertRecord:
    """Stands in for objects a checkpoint stores beside its weights; never runs their code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def _allowed_globals() -> list:
    allowed = [(_InertRecord, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]
    try:
        import numpy as np

        scalar = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
        allowed += [scalar.scalar, np.dtype]
        allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32")]
    except Exception:  # numpy absent or reorganised: such records then stay refused
        pass
    return allowed


class CheckpointReader:
    """Keys and tensors of one checkpoint file, read on demand.

    Use as a context manager; `get(key)` returns a CPU tensor in the file's dtype.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.global_step: int | None = None
        self._handle = None
        self._tensors: dict | None = None
        self._mapped = contextlib.ExitStack()
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        if self.path.stat().st_size == 0:
            raise CheckpointError(f"{self.path}: the file is empty; copy the checkpoint again")
        suffix = self.path.suffix.lower()
        if suffix == ".safetensors":
            self._open_safetensors()
        elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._open_pickle()
        else:
            raise CheckpointError(f"{self.path}: not a checkpoint; use a .safetensors or .ckpt file")
        if not self.keys():
            raise CheckpointError(f"{self.path}: the file holds no weights")
        self._key_set = set(self.keys())

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self.metadata = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
            # Its tensors, written unchanged, are copied file to file (safetensors_stream.mapped_file).
            ends = {key: self._handle.get_tensor(key) for key in self._keys[:1] + self._keys[-1:]}
            self._mapped.enter_context(mapped_file(self.path, ends))
        except Exception as e:  # safetensors raises its own error types for every kind of damage
            raise CheckpointError(f"{self.path}: not a readable .safetensors file ({_first_line(e)}); it may be truncated, download or copy it again") from None
        step = self.metadata.get("global_step") or self.metadata.get("ss_steps")
        self.global_step = int(step) if step and step.isdigit() else None

    def _open_pickle(self) -> None:
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                data = self._torch_load()
        except pickle.UnpicklingError as e:
            # torch's own text (a page about changed defaults and re-running with weights_only=False)
            # is advice to run the code: say what was refused in our words instead.
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise CheckpointError(refusal(self.path, unsafe.group(1) if unsafe else None)) from None
        except Exception as e:  # torch.load fails in many ways on damaged or foreign files
            raise CheckpointError(f"{self.path}: not a readable checkpoint ({_first_line(e)}); it may be truncated, download or copy it again") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.path}: not a Stable Diffusion checkpoint (holds a {type(data).__name__}, not a dict of weights)")
        step = data.get("global_step")
        self.global_step = int(step) if isinstance(step, int) else None
        if isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        self._tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        self._keys = list(self._tensors)

    def _torch_load(self):
        # torch warns about pickle protocols of plain and pre-1.6 files on stderr; what matters is said by
        # our own message (or nothing, when the file loads).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Files saved by PyTorch before 1.6 cannot be memory-mapped.
                return torch.load(self.path, map_location="cpu", weights_only=True)

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({_first_line(e)}); the file may be truncated") from None

    def get_slice_shape(self, key: str) -> tuple[int, ...]:
        """The shape of a tensor without reading its data (where the format allows)."""
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._handle.get_slice(key).get_shape())

    def close(self) -> None:
        self._mapped.close()
        self._handle = None
        self._tensors = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def refusal(path: Path, code: str | None) -> str:
    """The one line for a .ckpt the weights-only loader refused; `code` is what torch named, else it is
    looked for in the pickle itself (read as opcodes: nothing in it runs)."""
    code = code or _code_in_pickle(path)
    what = f"it asks to run code ('{code}')" if code else "it is a plain Python pickle, which can run code when loaded"
    return (f"{path}: refused to load: {what}, and only plain weights are loaded from a .ckpt; convert it to "
            ".safetensors with a tool you trust, or use a .safetensors version of this model")


# What a PyTorch checkpoint's pickle names to rebuild its tensors: not code we need to point at.
_TORCH_REBUILD = re.compile(r"^(torch\.|torch\._utils\.|collections\.OrderedDict$|_codecs\.encode$)")


def _code_in_pickle(path: Path) -> str | None:
    """The first callable a pickle names beyond torch's tensor rebuilding, from its opcodes; None when none
    (or the file is not a pickle we can walk)."""
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if isinstance(arg, str):
                    strings = (strings + [arg])[-2:]
                if opcode.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                    name = ".".join(strings)
                else:
                    continue
                if not _TORCH_REBUILD.match(name):
                    return name
    except Exception:  # a damaged or foreign stream: the caller's sentence stands without a name
        return None
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def save_checkpoint(tensors: dict[str, torch.Tensor], path: str | Path, *, fmt: str = "safetensors",
                    metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write a flat dict of tensors as `.safetensors` (default) or `.ckpt`, atomically.

    A `.ckpt` holds `{"state_dict": tensors}` as the web UI expects.
    Raises FileExistsError when the file exists and `overwrite` is False.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    path = Path(path)
    if fmt == "safetensors":
        from .safetensors_stream import in_file_order, write_safetensors

        # Written tensor by tensor: no second in-memory copy of the whole file.
        tensors, data_start = in_file_order(tensors)
        layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        return write_safetensors(path, layout, tensors.items(), metadata=metadata, overwrite=overwrite,
                                 data_start=data_start)
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save({"state_dict": tensors, **({"metadata": metadata} if metadata else {})}, tmp)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20, stop: threading.Event | None = None) -> str:
    """SHA-256 of the whole file, as the web UI computes it for checkpoint titles.

    With `stop`, gives up (returning "") as soon as it is set. Raises OSError when the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                return ""
            digest.update(block)
    return digest.hexdigest()


class BackgroundSha256:
    """`file_sha256(path)` computed in a thread while the caller converts or merges the same file.

    Reading and hashing release the GIL, so the hash of a multi-GB checkpoint (seconds) overlaps
    with the caller's own reading and writing instead of adding to it. Use as a context manager;
    `result()` waits for the digest and raises what the hashing raised. Leaving the block early
    (an error) stops the thread at its next chunk.
    """

    def __init__(self, path: str | Path, cache: HashCache | None = None):
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._digest = cache.get(Path(path)) if cache is not None else None
        self._thread: threading.Thread | None = None
        if self._digest is None:  # not hashed before (or changed since): hashed now, beside the work
            _leave_a_core_for_hashing()
            self._thread = threading.Thread(target=self._run, args=(Path(path), cache), daemon=True, name="sha256")
            self._thread.start()

    @classmethod
    def known(cls, digest: str) -> "BackgroundSha256":
        """One whose `result()` is `digest` ("": no hash), with nothing to read."""
        done = cls.__new__(cls)
        done._stop, done._error, done._digest, done._thread = threading.Event(), None, digest, None
        return done

    @property
    def pending(self) -> bool:
        """Whether the hash is being computed (else `result()` is at hand: a known digest or "")."""
        return self._thread is not None

    def _run(self, path: Path, cache: HashCache | None) -> None:
        try:
            stamp = file_stamp(path)
            self._digest = file_sha256(path, stop=self._stop)
            if cache is not None and self._digest:
                cache.put(path, self._digest, stamp)
        except BaseException as e:  # handed to the caller by result()
            self._error = e

    def result(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest or ""

    def __enter__(self) -> "BackgroundSha256":
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            _give_the_core_back()


# Per thread (torch's CPU thread count is the calling thread's own: OpenMP): how many hashes that thread
# runs beside its work, and its torch thread count before the first.
_hashing = threading.local()


def _leave_a_core_for_hashing() -> None:
    """One torch CPU thread fewer, in the calling thread, while a hash runs beside its work.

    torch splits each operation over all its threads and waits for the slowest; with the hash busy on
    one of the cores, that thread waits its turn, and on 2 cores a merge's casts and products took 3x
    longer (0.98 s of casts with 2 threads, 0.33 s with 1, in a full-size SD 1.5 merge).
    """
    depth = getattr(_hashing, "depth", 0)
    if depth == 0:
        _hashing.threads = torch.get_num_threads()
        torch.set_num_threads(max(1, _hashing.threads - 1))
    _hashing.depth = depth + 1


def _give_the_core_back() -> None:
    _hashing.depth -= 1
    if _hashing.depth == 0:
        torch.set_num_threads(_hashing.threads)


def iter_tensors(reader: CheckpointReader, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for key in keys:
        yield key, reader.get(key)
