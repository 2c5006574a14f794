"""What the extension asked of the stand-in web UI, in order (tests only)."""
from __future__ import annotations

calls: list[tuple] = []


def record(name: str, *args) -> None:
    calls.append((name, *args))


def names() -> list[str]:
    return [c[0] for c in calls]


def reset() -> None:
    calls.clear()
