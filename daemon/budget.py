"""The CPU budget: how long to rest after computing, as pure arithmetic.

The budget is ``duty_cycle x threads`` CPU-seconds per second of wall time. After a piece of
work (a chunk and its checkpoint, or the trainer's start-up) that used ``cpu_s`` seconds of CPU
over ``wall_s`` seconds, the daemon rests for

    rest = cpu_s / (duty_cycle x threads) - wall_s        (never below zero)

so that over work plus rest the process used exactly its share. With one thread that is fully
busy (cpu_s = wall_s = t) this is the classic duty cycle ``t x (1 - d) / d``. Counting CPU time
rather than wall time keeps the share right when other programs slow the trainer down: time
spent waiting for a core is not charged, so the rest shrinks instead of the device's other work
being starved twice.
"""

from __future__ import annotations

import math

MAX_REST_S = 3600.0  # one chunk never earns more than an hour of rest


def share(*, duty_cycle: float, threads: int) -> float:
    """The configured share in cores: CPU-seconds per wall second."""
    if not 0.0 < duty_cycle <= 1.0:
        raise ValueError(f"duty_cycle must be in (0, 1], got {duty_cycle!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return duty_cycle * threads


def rest_seconds(*, cpu_s: float, wall_s: float, duty_cycle: float, threads: int = 1) -> float:
    """Seconds to rest after work that took ``cpu_s`` of CPU over ``wall_s`` of wall time."""
    if not (math.isfinite(cpu_s) and math.isfinite(wall_s)) or cpu_s < 0 or wall_s < 0:
        raise ValueError(f"cpu_s and wall_s must be finite and not negative, got {cpu_s!r}, {wall_s!r}")
    rest = cpu_s / share(duty_cycle=duty_cycle, threads=threads) - wall_s
    return min(max(rest, 0.0), MAX_REST_S)


def measured_share(*, cpu_s: float, wall_s: float) -> float:
    """CPU-seconds per wall second over a measured interval."""
    if wall_s <= 0:
        raise ValueError(f"wall_s must be positive, got {wall_s!r}")
    return cpu_s / wall_s


def backoff_seconds(*, failures: int, base_s: float, max_s: float = 3600.0) -> float:
    """Wait after the n-th failure in a row: ``base_s``, doubling, at most ``max_s``."""
    if failures < 1:
        return 0.0
    return min(base_s * 2.0 ** min(failures - 1, 30), max_s)
