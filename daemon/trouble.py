"""Problems of the device the daemon cannot fix itself, each said once, each retried on a back-off.

A full disk, a state folder it may not write, a broker that refuses the site's credentials: none
of these is solved by exiting (under systemd's ``Restart=on-failure`` that is a crash loop which
logs a traceback every few seconds and loses nothing but the operator's patience). The daemon
stays up, keeps pinging the watchdog, keeps what it has stored, and tries again later.

:class:`Troubles` keeps one entry per kind of problem (a short key such as ``"storage"`` or
``"broker"``). Reporting a problem logs one line the first time, and again only when its text
changes (a distinct problem); repeats are counted, not logged. Each report doubles the wait
before the next try, from ``base_s`` up to ``max_s``. Clearing a problem logs one line saying it
is over (with how many repeats were not logged) and resets its back-off. The clock is passed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .budget import backoff_seconds

RETRY_BASE_S = 5.0
RETRY_MAX_S = 600.0


@dataclass
class _Entry:
    message: str
    failures: int
    retry_at: float
    repeats: int = 0


class Troubles:
    """The problems now present, by key, with their next retry time."""

    def __init__(self, *, log: logging.Logger, base_s: float = RETRY_BASE_S, max_s: float = RETRY_MAX_S) -> None:
        self._log = log
        self.base_s = base_s
        self.max_s = max_s
        self._entries: dict[str, _Entry] = {}
        self.changes = 0  # counts problems that appeared, changed or ended: the telemetry follows

    def report(self, key: str, message: str, now: float, *, level: int = logging.ERROR) -> float:
        """Note that ``key`` failed with ``message`` at ``now``; returns the wait before the next try.
        Logs only a problem that is new or whose text changed."""
        entry = self._entries.get(key)
        failures = 1 if entry is None else entry.failures + 1
        wait = backoff_seconds(failures=failures, base_s=self.base_s, max_s=self.max_s)
        if entry is None or entry.message != message:
            self._log.log(level, "%s", message)
            self.changes += 1
            self._entries[key] = _Entry(message=message, failures=failures, retry_at=now + wait)
        else:
            entry.failures, entry.retry_at, entry.repeats = failures, now + wait, entry.repeats + 1
        return wait

    def clear(self, key: str, message: str | None = None) -> bool:
        """The problem ``key`` is over; logs ``message`` (if given) when there was one. True if there was."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.changes += 1
        if message is not None:
            again = f" (it came back {entry.repeats} more time(s) meanwhile)" if entry.repeats else ""
            self._log.info("%s%s", message, again)
        return True

    def active(self, key: str) -> bool:
        return key in self._entries

    def due(self, key: str, now: float) -> bool:
        """True when ``key`` has no problem or its wait is over: time to try (again)."""
        entry = self._entries.get(key)
        return entry is None or now >= entry.retry_at

    def next_at(self) -> float | None:
        """The earliest retry time, for the loop's wait."""
        return min((e.retry_at for e in self._entries.values()), default=None)

    def message(self, key: str) -> str | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.message

    def summary(self) -> str | None:
        """The first problem's text, for the telemetry's ``error``."""
        return next((e.message for e in self._entries.values()), None)
