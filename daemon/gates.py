"""Gates: the conditions under which training pauses, as pure functions of readings.

Three gates, each open or closed:

* temperature: closes at ``max_temperature_c`` or above, opens again only at
  ``max_temperature_c - temperature_hysteresis_c`` or below (so it does not flap around the
  limit). A missing reading leaves the gate as it was.
* battery: only while running on battery (not charging). Closes below ``min_battery_percent``,
  opens again at ``min_battery_percent + battery_hysteresis_percent`` or above, or as soon as the
  charger is plugged in. A device without a battery never closes it.
* time windows: local ``HH:MM-HH:MM`` ranges (start included, end excluded; a range whose end is
  before its start runs past midnight). Outside every window the gate is closed. No windows
  means always open.

Training runs only while all three are open. :func:`evaluate` takes the previous
:class:`GateState` and new :class:`Readings` and returns the next state; it reads no sensor and
no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from .errors import DaemonError

_WINDOW = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")
MINUTES_PER_DAY = 24 * 60


class WindowError(DaemonError, ValueError):
    """A time window is not ``HH:MM-HH:MM`` with valid times."""


def parse_window(text: str) -> tuple[int, int]:
    """``"22:00-06:00"`` -> (start, end) in minutes after midnight."""
    m = _WINDOW.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise WindowError(f"{text!r} is not a window like 22:00-06:00")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise WindowError(f"{text!r} holds a time that does not exist")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % MINUTES_PER_DAY:
        raise WindowError(f"{text!r} is empty; leave windows out to train at any time")
    return start, end


def in_window(minute: int, window: tuple[int, int]) -> bool:
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


class GateSettings(Protocol):
    max_temperature_c: float | None
    temperature_hysteresis_c: float
    min_battery_percent: float | None
    battery_hysteresis_percent: float
    windows: Sequence[str]


@dataclass(frozen=True)
class Readings:
    temperature_c: float | None  # hottest relevant sensor, None when unknown
    battery_percent: float | None  # None without a battery
    charging: bool | None  # None when unknown (treated as not charging)
    minute_of_day: int  # local time, 0..1439


@dataclass(frozen=True)
class GateState:
    temperature: bool = False  # True = this gate is closed
    battery: bool = False
    window: bool = False
    temperature_c: float | None = None
    battery_percent: float | None = None

    @property
    def open(self) -> bool:
        return not (self.temperature or self.battery or self.window)

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why training is paused, short and human, e.g. ``("temperature 81.0 C",)``."""
        out = []
        if self.temperature:
            out.append(f"temperature {self.temperature_c:.1f} C" if self.temperature_c is not None
                       else "temperature")
        if self.battery:
            out.append(f"battery {self.battery_percent:.0f} %" if self.battery_percent is not None else "battery")
        if self.window:
            out.append("outside time windows")
        return tuple(out)


def evaluate(cfg: GateSettings, prev: GateState, r: Readings) -> GateState:
    """The gates after readings ``r``, given the gates before them."""
    hot = prev.temperature
    if cfg.max_temperature_c is None:
        hot = False
    elif r.temperature_c is not None:
        limit = cfg.max_temperature_c - cfg.temperature_hysteresis_c if prev.temperature else cfg.max_temperature_c
        hot = r.temperature_c > limit if prev.temperature else r.temperature_c >= limit
    low = False
    if cfg.min_battery_percent is not None and r.battery_percent is not None and not r.charging:
        if prev.battery:
            low = r.battery_percent < cfg.min_battery_percent + cfg.battery_hysteresis_percent
        else:
            low = r.battery_percent < cfg.min_battery_percent
    windows = [parse_window(w) for w in cfg.windows]
    outside = bool(windows) and not any(in_window(r.minute_of_day % MINUTES_PER_DAY, w) for w in windows)
    return GateState(
        temperature=hot,
        battery=low,
        window=outside,
        temperature_c=r.temperature_c if r.temperature_c is not None else prev.temperature_c,
        battery_percent=r.battery_percent,
    )
