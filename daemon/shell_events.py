"""What the daemon's shell loop waits for: queued items from other threads, and its own timers.

Other threads (the MQTT pump, a trainer's reader, a signal handler) never touch the daemon's
state; they put one of the :data:`Queued` items on the loop's queue. The loop's own periodic work
(reading the gates, publishing telemetry, pinging the watchdog) is kept as named deadlines in
:class:`Timers`; :meth:`Timers.due` says which have come, so the loop reacts to typed events only.
All times here are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Union

from fednca.transport.base import Message

from .supervisor import FromTrainer


@dataclass(frozen=True)
class StopAsked:
    """A signal handler or another thread asked the daemon to stop."""


@dataclass(frozen=True)
class Inbound:
    """A message the broker delivered (QoS 1: acknowledged once handled)."""

    message: Message


Queued = Union[StopAsked, Inbound, FromTrainer]


class Timer(Enum):
    GATES = "gates"  # read the sensors again
    TELEMETRY = "telemetry"  # publish the status
    WATCHDOG = "watchdog"  # ping systemd's watchdog


class Timers:
    """One deadline per :class:`Timer`; 0 means due at once (the state after a start)."""

    def __init__(self) -> None:
        self._at = {t: 0.0 for t in Timer}

    def set(self, timer: Timer, at: float) -> None:
        self._at[timer] = at

    def due(self, timer: Timer, now: float) -> bool:
        return now >= self._at[timer]

    def next_at(self) -> float | None:
        """The earliest deadline that is set, for the loop's wait."""
        times = [t for t in self._at.values() if t > 0]
        return min(times) if times else None
