"""A counter of the bytes that tensors made by torch operations hold, live and at their peak.

Run under torch's FakeTensorMode, operations allocate nothing, yet every
tensor still has a storage of a known size that is freed when the last tensor
using it goes away. Counting those storages as they appear and disappear gives
the memory a piece of work needs without running it, on any machine. Each
allocation is rounded up as CUDA's caching allocator rounds it (512 bytes).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA_ROUNDING = 512  # the caching allocator hands out blocks in multiples of this


def allocated_size(nbytes: int) -> int:
    """What the CUDA caching allocator takes for a request of `nbytes`."""
    return -(-nbytes // CUDA_ROUNDING) * CUDA_ROUNDING if nbytes else 0


class LiveBytes(TorchDispatchMode):
    """Counts the storages that operations run inside it create (`live`, `peak`, in bytes).

    Storages that existed before (weights, inputs) are never counted, nor are
    outputs that share the storage of an input (views, in-place operations).
    `reset_peak` starts a new peak from what is live now.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "prim":  # metadata queries (device, layout): nothing allocated
            return out
        outputs = [s for s in map(_storage, _tensors(out)) if s is not None]
        if not outputs:
            return out
        inputs = {id(s) for s in map(_storage, _tensors(args)) if s is not None}
        inputs.update(id(s) for s in map(_storage, _tensors(list(kwargs.values()) if kwargs else [])) if s is not None)
        for storage in outputs:
            key = id(storage)
            if key in inputs or key in self._sizes:
                continue
            size = allocated_size(storage.nbytes())
            self._sizes[key] = size
            self.live += size
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def _tensors(values) -> list:
    """The tensors among `values`: an op's output or arguments (tensors, lists or tuples of them, other values)."""
    if isinstance(values, torch.Tensor):
        return [values]
    if not isinstance(values, (list, tuple)):
        return []
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _storage(value):
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a storage of their own (e.g. sparse)
        return None
