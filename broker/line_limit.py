"""Round-log lines that a flood cannot multiply: at most one line per key and window, then a count.

A site that sends thousands of bad updates would otherwise write thousands of ``update_rejected``
lines (and as many ``logging`` lines and ``events`` messages): the round log, kept forever, and
the journal would grow with the flood. Each line that can repeat at a peer's will carries a key
(its kind, the site, the reason): the first ``lines`` lines of a key in a window of ``window_s``
seconds are written (a few, so that a handful of distinct mistakes each leave their line); later
ones in that window are only counted; once the window has passed, :meth:`due` returns one
:class:`~.roundlog.LinesSuppressedRecord` per key with the count of lines left out. So each site
can cause at most ``lines + 1`` lines per kind and reason per window, whatever it sends.

The lines that decide something (an update accepted, a round closed) are never keyed: only
verdicts on what a peer sent, which a peer can repeat without limit.

Pure: the clock reading is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .roundlog import LinesSuppressedRecord

WINDOW_S = 60.0
LINES = 3  # written per key and window before the rest are counted


@dataclass(frozen=True)
class LineKey:
    kind: str  # the round-log kind of the lines
    site: str
    reason: str  # the reason code, or "" for a kind without one


@dataclass
class _Window:
    start: float
    written: int = 1
    suppressed: int = 0
    first_suppressed: float = 0.0


class LineLimiter:
    """Decides, per :class:`LineKey`, which lines are written and which are counted."""

    def __init__(self, *, window_s: float = WINDOW_S, lines: int = LINES) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        if lines < 1:
            raise ValueError(f"lines must be at least 1, got {lines!r}")
        self.window_s = window_s
        self.lines = lines
        self._windows: dict[LineKey, _Window] = {}

    def offer(self, key: LineKey, now: float) -> bool:
        """True: write this line (one of the first ``lines`` of its key in the window); False: it
        is counted."""
        window = self._windows.get(key)
        if window is None or now - window.start >= self.window_s:
            if window is not None and window.suppressed:
                return self._count(window, now)  # :meth:`due` has not closed it yet: keep counting
            self._windows[key] = _Window(start=now)
            return True
        if window.written < self.lines and not window.suppressed:
            window.written += 1
            return True
        return self._count(window, now)

    @staticmethod
    def _count(window: _Window, now: float) -> bool:
        if not window.suppressed:
            window.first_suppressed = now
        window.suppressed += 1
        return False

    def due(self, now: float) -> list[LinesSuppressedRecord]:
        """One summary line per key whose window has passed with lines left out; windows that
        passed are closed, so the next line of their key is written again."""
        out: list[LinesSuppressedRecord] = []
        for key, window in list(self._windows.items()):
            if now - window.start < self.window_s:
                continue
            del self._windows[key]
            if window.suppressed:
                out.append(LinesSuppressedRecord(at=now, line_kind=key.kind, site=key.site, reason=key.reason,
                                                 count=window.suppressed, since=window.first_suppressed))  # fmt: skip
        return out

    @property
    def pending(self) -> int:
        """Lines counted and not yet summarised."""
        return sum(w.suppressed for w in self._windows.values())
