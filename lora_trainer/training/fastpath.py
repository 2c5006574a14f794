"""The fast path, "Compile UNet (fast path)": the UNet's training forward and backward through
`torch.compile` (inductor), with the LoRA adapters inside the compiled graph; on a CUDA GPU with one
picture shape (no aspect buckets) also CUDA graphs (mode "reduce-overhead"), which replay a step's
kernels without launching them one by one.

What cannot run is refused before anything is loaded (`compile_problem`); a compilation that fails
during the run falls back to the eager UNet with one warning and the run goes on (`CompiledUNet`).
Only the training step is compiled: previews, sample grids and the validation loss run the eager
module, whose weights are the same tensors.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys

import torch

log = logging.getLogger(__name__)

COMPILE = "Compile UNet (fast path) ('compile_unet')"
FALLBACK = ("{option}: torch.compile failed ({reason}); training goes on with the eager UNet, as without the option. "
            "Untick it to skip the attempt")
# A failure of these is no compiler's fault: they go to the caller as they would without the option.
NOT_COMPILE_FAILURES = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), KeyboardInterrupt)


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot train on `device` here (one phrase), or None when it can.

    Inductor needs dynamo (torch >= 2 on a Python it supports), a C++ compiler for the CPU's kernels
    (`CXX`, else g++; MSVC's cl on Windows) and, on a CUDA GPU, triton with a C compiler for its launchers.
    """
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (torch >= 2.0 has)"
    import torch._dynamo as dynamo

    if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
        return (f"torch {torch.__version__} cannot compile on Python "
                f"{sys.version_info.major}.{sys.version_info.minor}")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            package = "triton-windows" if sys.platform == "win32" else "triton"
            return f"on a CUDA GPU it needs the {package} package, which is not installed"
        if not any(shutil.which(c) for c in (os.environ.get("CC"), "gcc", "clang", "cc", "cl") if c):
            return "triton needs a C compiler (gcc or clang) and none was found on PATH"
        return None
    if device.type != "cpu":
        return f"it is only offered on the CPU and CUDA GPUs, not on {device.type}"
    default = "cl" if sys.platform == "win32" else "clang++" if sys.platform == "darwin" else "g++"
    compiler = os.environ.get("CXX", default)
    if shutil.which(compiler) is None:
        return (f"on the CPU it compiles C++ with {compiler!r}, which was not found on PATH "
                f"(install it{' (Visual Studio Build Tools)' if default == 'cl' else ''}, or set CXX)")
    return None


def compile_mode(device: torch.device, static_shapes: bool) -> str | None:
    """torch.compile's mode: CUDA graphs ("reduce-overhead") on a CUDA GPU when every step has one
    shape; otherwise inductor's default (one compilation per shape)."""
    return "reduce-overhead" if device.type == "cuda" and static_shapes else None


class CompiledUNet:
    """The UNet's training forward: compiled while compiling works, the eager module after a failure.

    `__call__` takes the UNet's arguments. `fall_back(error)` switches to the eager module for the rest of
    the run and logs FALLBACK once.
    """

    def __init__(self, unet: torch.nn.Module, device: torch.device, *, static_shapes: bool):
        self.eager = unet
        self.mode = compile_mode(device, static_shapes)
        self.cuda_graphs = self.mode == "reduce-overhead"
        self.compiled = torch.compile(unet, mode=self.mode, dynamic=False)
        self.active = True
        log.info("Compile UNet: the UNet's training step goes through torch.compile (%s); the first step "
                 "(and the first of each new picture shape) takes longer while it compiles",
                 "CUDA graphs" if self.cuda_graphs else "inductor")

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.eager(*args, **kwargs)
        if self.cuda_graphs and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        return self.compiled(*args, **kwargs)

    def fall_back(self, error: BaseException) -> None:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
        log.warning(FALLBACK.format(option=COMPILE, reason=reason))
        self.active = False
