"""Where a run stands after a step, so that a run started again goes on exactly as if it never stopped.

A position holds the step count, the data order's place (epoch and batch in
the epoch), the gradient-accumulation phase, the random generators (python,
numpy, torch, CUDA), the learning-rate schedule and the fp16 loss scaler. It
is captured after every completed optimizer step (a Cancel in the middle of
an accumulation goes back to the last completed step, whose weights are the
ones saved) and written with the resume state as `position.safetensors`: the
generator states as tensors, the rest as JSON in its metadata.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..checkpoint_io import save_checkpoint

POSITION_FILE = "position.safetensors"


@dataclass
class RunPosition:
    step: int                      # optimizer steps done in this run
    micro_batches: int             # batches seen in this run (for the epoch count)
    epoch: int                     # epochs of this run begun before the next batch (0 = the first)
    batch_in_epoch: int            # batches of that epoch already used
    accumulation_step: int         # accelerate's micro-step counter: the gradient-accumulation phase
    lr_scheduler: dict
    scaler: dict | None
    python_rng: tuple
    numpy_rng: tuple
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] = field(default_factory=list)


def capture(loop, *, step: int, micro_batches: int, epoch: int, batch_in_epoch: int) -> RunPosition:
    """The position of `loop` (a training.loop.Loop) right after a completed step."""
    if batch_in_epoch >= max(len(loop.loader), 1):  # the epoch is used up: the next batch begins the next one
        epoch, batch_in_epoch = epoch + 1, 0
    scaler = getattr(loop.accelerator, "scaler", None)
    return RunPosition(step, micro_batches, epoch, batch_in_epoch, int(getattr(loop.accelerator, "step", 0)),
                       _plain(loop.lr_scheduler.state_dict()), scaler.state_dict() if scaler is not None else None,
                       random.getstate(), np.random.get_state(), torch.get_rng_state(),
                       torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
                       else [])


def restore(loop, position: RunPosition) -> None:
    """Put `loop` where `position` says: schedule (and the learning rates it set), scaler, accumulation
    phase, the data order's place (see `skip_batches`) and, last, every random generator."""
    loop.lr_scheduler.load_state_dict(position.lr_scheduler)
    for group, lr in zip(loop.optimizer.param_groups, position.lr_scheduler["_last_lr"]):
        group["lr"] = lr  # the schedule sets them at each step; a new optimizer starts at the base rates
    scaler = getattr(loop.accelerator, "scaler", None)
    if scaler is not None and position.scaler is not None:
        scaler.load_state_dict(position.scaler)
    loop.accelerator.step = position.accumulation_step
    random.setstate(position.python_rng)
    np.random.set_state(position.numpy_rng)
    torch.set_rng_state(position.torch_rng)
    if position.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(position.cuda_rng[:torch.cuda.device_count()])


def save_position(position: RunPosition, path: Path) -> None:
    """Write `position` as safetensors (generator states as uint8 tensors, the rest as JSON metadata)."""
    name, keys, pos, has_gauss, gauss = position.numpy_rng
    tensors = {"torch_rng": position.torch_rng.contiguous(), "numpy_keys": torch.from_numpy(np.asarray(keys).astype(np.int64))}
    tensors.update({f"cuda_rng.{i}": state.contiguous() for i, state in enumerate(position.cuda_rng)})
    plain = {"step": position.step, "micro_batches": position.micro_batches, "epoch": position.epoch,
             "batch_in_epoch": position.batch_in_epoch, "accumulation_step": position.accumulation_step,
             "lr_scheduler": position.lr_scheduler, "scaler": position.scaler,
             "python_rng": [position.python_rng[0], list(position.python_rng[1]), position.python_rng[2]],
             "numpy_rng": [name, int(pos), int(has_gauss), float(gauss)]}
    save_checkpoint(tensors, path, metadata={"position": json.dumps(plain)}, overwrite=True)


def load_position(path: Path) -> RunPosition:
    """The position `save_position` wrote. Raises OSError, ValueError or KeyError for a damaged file."""
    with safe_open(str(path), framework="pt") as f:
        plain = json.loads(f.metadata()["position"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    version, state, gauss = plain["python_rng"]
    name, pos, has_gauss, cached = plain["numpy_rng"]
    cuda = [tensors[f"cuda_rng.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda_rng.")]))]
    return RunPosition(plain["step"], plain["micro_batches"], plain["epoch"], plain["batch_in_epoch"],
                       plain["accumulation_step"], plain["lr_scheduler"], plain["scaler"],
                       (version, tuple(state), gauss),
                       (name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
                       tensors["torch_rng"], cuda)


def _plain(state: dict) -> dict:
    """A scheduler's state_dict as JSON holds it (its lambdas are functions, kept as None: the run makes them again)."""
    return json.loads(json.dumps(state, default=float))
