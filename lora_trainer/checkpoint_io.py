"""Reading and writing original-layout checkpoint files, safely.

`.safetensors` is read lazily, one tensor at a time. `.ckpt` is a pickle: it is
loaded with PyTorch's weights-only unpickler (memory-mapped where the file
allows), so a pickle that asks to run code is refused and nothing it asks for
runs. The few harmless objects real Stable Diffusion `.ckpt` files carry
beside the weights (a Lightning callback record, numpy scalars) are read as
inert placeholders.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import CheckpointError
from .fileio import atomic_path

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

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self.metadata = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
        except Exception as e:  # safetensors raises its own error types for every kind of damage
            raise CheckpointError(f"{self.path}: not a readable .safetensors file ({_first_line(e)}); it may be truncated, download or copy it again") from None
        step = self.metadata.get("global_step") or self.metadata.get("ss_steps")
        self.global_step = int(step) if step and step.isdigit() else None

    def _open_pickle(self) -> None:
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                data = self._torch_load()
        except pickle.UnpicklingError as e:
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it asks to run '{unsafe.group(1)}'" if unsafe else _first_line(e)
            raise CheckpointError(f"{self.path}: refused to load: {what}. Only plain weights are loaded from .ckpt files; use a .safetensors version of this model") from None
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
        return key in set(self._keys) if self._tensors is None else key in self._tensors

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
        self._handle = None
        self._tensors = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        from .safetensors_stream import write_safetensors

        # Written tensor by tensor: no second in-memory copy of the whole file.
        layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        return write_safetensors(path, layout, tensors.items(), metadata=metadata, overwrite=overwrite)
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save({"state_dict": tensors, **({"metadata": metadata} if metadata else {})}, tmp)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of the whole file, as the web UI computes it for checkpoint titles."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def iter_tensors(reader: CheckpointReader, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for key in keys:
        yield key, reader.get(key)
