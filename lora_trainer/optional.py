"""Features that need optional parts (a CUDA GPU, bitsandbytes, xformers, prodigyopt): usable or why not.

The UI disables an option whose feature has a reason and shows the reason.
Nothing here installs anything; install.py tries the optional packages and
records a failure in install-state.json, whose reason is shown here.
"""
from __future__ import annotations

import functools
import os
import importlib
import importlib.metadata
import importlib.util
from pathlib import Path

from .installer import OPTIONAL, STATE_FILE, InstallState, canonical_name, satisfies

# bitsandbytes runs its 8-bit optimizers on the CPU from this release on (older ones need CUDA).
BITSANDBYTES_ON_CPU = ">=0.50"

# Beside install.py, in the extension folder (not resolved: the folder may be a link).
STATE_PATH = Path(os.path.abspath(__file__)).parent.parent / STATE_FILE


def _cuda_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build: training runs on the CPU, without half precision"
    return f"torch {torch.__version__} finds no CUDA GPU: training runs on the CPU, without half precision"


def bitsandbytes_runs_on_cpu() -> bool:
    """Whether the installed bitsandbytes (if any) runs 8-bit AdamW on the CPU; imports nothing."""
    try:
        return satisfies(importlib.metadata.version("bitsandbytes"), BITSANDBYTES_ON_CPU)
    except importlib.metadata.PackageNotFoundError:
        return False


def _package_reason(name: str, module: str, cuda_reason: str | None, state: InstallState) -> str | None:
    need = next(n for n in OPTIONAL if n.name == name)
    if importlib.util.find_spec(module.split(".")[0]) is None:
        failed = state.data.get("failed", {}).get(canonical_name(name))
        why = f"; install.py could not install it: {failed['reason']}" if failed else ""
        return f"{name} is not installed ({need.purpose} needs it){why}"
    if cuda_reason is not None and need.needs_cuda and not (name == "bitsandbytes" and bitsandbytes_runs_on_cpu()):
        also = (f", or bitsandbytes{BITSANDBYTES_ON_CPU} on the CPU (installed: {importlib.metadata.version(name)})"
                if name == "bitsandbytes" else "")
        return f"{need.purpose} needs a CUDA GPU{also} ({cuda_reason.split(':')[0]})"
    try:
        importlib.import_module(module)
    except Exception as error:  # a build that does not match this torch or driver
        return f"{name} is installed but does not load: {type(error).__name__}: {error}"
    return None


@functools.lru_cache(maxsize=None)
def optional_features() -> dict[str, str | None]:
    """Feature name -> None when usable, else the reason it is not: keys "cuda", "bitsandbytes", "xformers",
    "prodigyopt"."""
    state = InstallState(STATE_PATH)
    cuda = _cuda_reason()
    return {
        "cuda": cuda,
        "bitsandbytes": _package_reason("bitsandbytes", "bitsandbytes", cuda, state),
        "xformers": _package_reason("xformers", "xformers.ops", cuda, state),
        "prodigyopt": _package_reason("prodigyopt", "prodigyopt", cuda, state),
    }
