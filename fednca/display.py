"""What the operator reads: times as dates or "in 5 min", and strings a site controls made safe.

Every command that reports something (the app's and the coordinator's) prints through these, so
the same moment reads the same everywhere and nothing a peer sends can drive the operator's
terminal. A site's telemetry, the
names of its metrics and the error texts it reports are its own word: a string with an ESC
sequence could move the cursor, rewrite earlier lines or set the window title. :func:`safe`
replaces every control character visibly (``\\x1b`` stays readable as those four characters) and
bounds the length; :func:`number` bounds what a number may print as. JSON output keeps the values
(``json.dumps`` escapes control characters itself) with times as unix seconds (floats), sizes in
bytes and ids as strings.
"""

from __future__ import annotations

import math
import time
import unicodedata

MAX_TEXT = 80  # characters of a peer's string shown in a table cell or a line


def safe(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` with every control or format character written as an escape, cut to ``limit``."""
    out = []
    for ch in str(text):
        if ch in "\t" or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: max(0, limit - 1)] + "…"


def number(value: float | int | None, fmt: str = ".3f", *, bound: float = 1e9) -> str:
    """A number as text, "-" when absent, and never wider than a bounded value's form."""
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(v):
        return "?"
    if abs(v) > bound:
        return f"{'>' if v > 0 else '<-'}{bound:.0e}"
    return format(v, fmt)


def local_time(at: float | None) -> str:
    """A clock reading (seconds since the epoch) as a local date and time."""
    if at is None or not math.isfinite(at):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def duration(seconds: float) -> str:
    """A span of time as a person says it: "40 s", "5 min", "2.5 h", "3 days"."""
    s = abs(seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


def relative(at: float | None, now: float) -> str:
    """A clock reading against ``now``: "in 5 min", "3 min ago" (a date beyond two days)."""
    if at is None or not math.isfinite(at):
        return "-"
    delta = at - now
    if abs(delta) >= 2 * 86400:
        return local_time(at)
    return f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"


def eta(done: int, total: int, elapsed: float) -> str:
    """"ETA 2 min" for the work left at the pace so far; "ETA ?" before any is done."""
    if done <= 0 or total <= done or elapsed <= 0:
        return "ETA ?" if done < total else "done"
    return f"ETA {duration(elapsed / done * (total - done))}"


class Pace:
    """The ETA of one round's planned steps from the pace since this process first saw it.

    Fed after each chunk with the round, the steps done and planned, and a clock reading; a new
    round (or a process restarted mid-round) starts the measurement again, so time spent before,
    paused by a gate or waiting for a round never counts as training pace.
    """

    def __init__(self) -> None:
        self._start: tuple[int, int, float] | None = None  # (round, steps, clock) at the first chunk

    def line(self, *, round: int, steps: int, planned: int, now: float) -> str:
        """``round 3: step 40 of 120 (33 %), ETA 4 min``"""
        if self._start is None or self._start[0] != round or steps < self._start[1]:
            self._start = (round, steps, now)
        _, steps0, t0 = self._start
        share = f"{100 * steps / planned:.0f} %" if planned > 0 else "?"
        return f"round {round}: step {steps} of {planned} ({share}), {eta(steps - steps0, planned - steps0, now - t0)}"
