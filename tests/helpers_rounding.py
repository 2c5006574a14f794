"""Checking a printed rate against the printed count and seconds it was worked out from, each rounded."""
from __future__ import annotations


def rate_fits(count: int, seconds: float, rate: float, *, seconds_step: float, rate_step: float) -> bool:
    """Whether `rate` (printed rounded to `rate_step`) is `count` over some time that rounds to `seconds`
    (printed rounded to `seconds_step`). A slow run's rate, below 1 per second, rounds coarsely against
    its seconds, so comparing `count / rate` with `seconds` by a fixed margin fails under load."""
    low, high = seconds - seconds_step / 2, seconds + seconds_step / 2
    slowest, fastest = count / high, (count / low if low > 0 else float("inf"))
    return rate > 0 and slowest - rate_step / 2 - 1e-9 <= rate <= fastest + rate_step / 2 + 1e-9
