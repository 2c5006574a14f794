"""Whether this Python can run LoRA Trainer at all, said in one message before anything fails deep in a callback.

Reads installed versions only (no heavy imports), so the web UI script can
call it first and register nothing, with a clear message, on a host it
cannot serve. The ranges are the installer's (requirements.txt says the same).
"""
from __future__ import annotations

import sys

from .installer import REQUIRED, Need, applying_limits, canonical_name, installed_versions, satisfies

MIN_PYTHON = (3, 10)
# Never installed by us: the host brings its own build (CUDA, ROCm, CPU).
TORCH = Need("torch", ">=2.1", "torch", "the host's own build")


def missing_requirements(installed: dict[str, str]) -> list[str]:
    """One 'needs X (found Y)' phrase per requirement the installed versions do not meet."""
    problems = []
    # Needs without a range (open-clip-torch) are not checked: the tokenizer says itself what it lacks.
    for need in (TORCH,) + tuple(n for n in REQUIRED if n.spec):
        version = installed.get(canonical_name(need.name))
        if version is None:
            problems.append(f"{need.requirement} (not installed)")
        elif not satisfies(version, need.spec):
            problems.append(f"{need.requirement} (found {version})")
    for need in REQUIRED:
        version = installed.get(canonical_name(need.name))
        for limit in applying_limits(need, installed):
            if version and not satisfies(version, limit.works):
                other = installed[canonical_name(limit.when)]
                problems.append(f"{limit.package}{limit.works} beside {limit.when} {other} (found {version}: {limit.why})")
    return problems


def unsupported_host_reason(installed: dict[str, str] | None = None,
                            python: tuple[int, int] = tuple(sys.version_info[:2])) -> str | None:
    """None when this host can run LoRA Trainer, else one message saying what is needed and how to get it."""
    installed = installed_versions() if installed is None else installed
    problems = missing_requirements(installed)
    if python < MIN_PYTHON:
        problems.insert(0, f"Python >= {'.'.join(map(str, MIN_PYTHON))} (found {'.'.join(map(str, python))})")
    if not problems:
        return None
    return ("LoRA Trainer is not loaded: it needs " + "; ".join(problems) + ". Restart the web UI so that the "
            "extension's install.py adds what is missing (it never changes installed versions), or install "
            "these into the web UI's Python yourself; supported hosts and versions: docs/hosts.md")
