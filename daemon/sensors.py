"""Readings of the device: temperature, battery, and the CPU and memory of the daemon's processes.

Temperature: psutil's ``sensors_temperatures()`` (hwmon); the first group found in
:data:`PREFERRED` order (Raspberry Pi ``cpu_thermal``, Jetson ``CPU-therm``, x86 ``coretemp`` /
``k10temp``, ...), else the hottest of all; without hwmon, the hottest
``/sys/class/thermal/thermal_zone*/temp`` (millidegrees). Battery: ``sensors_battery()``, None on
a device without one. The choice of a reading is pure (:func:`pick_temperature`,
:func:`zone_temperature`); only :class:`Sensors` touches the system.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import psutil

from .gates import Readings

log = logging.getLogger("fednca.daemon")

PREFERRED = ("cpu_thermal", "CPU-therm", "cpu-thermal", "soc_thermal", "coretemp", "k10temp", "cpu_thermal_zone",
             "acpitz")
THERMAL_ZONES = "/sys/class/thermal/thermal_zone*/temp"


def pick_temperature(groups: Mapping[str, Sequence[object]]) -> float | None:
    """One temperature in degrees C from psutil's ``{group: [shwtemp(label, current, ...)]}``."""
    def currents(entries: Sequence[object]) -> list[float]:
        vals = [getattr(e, "current", None) for e in entries]
        return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v) and -50 < v < 200]

    for name in PREFERRED:
        found = currents(groups.get(name, ()))
        if found:
            return max(found)
    every = [v for entries in groups.values() for v in currents(entries)]
    return max(every) if every else None


def zone_temperature(texts: Iterable[str]) -> float | None:
    """The hottest of sysfs thermal zone readings (millidegrees C as text)."""
    values = []
    for text in texts:
        try:
            v = int(text.strip()) / 1000.0
        except ValueError:
            continue
        if -50 < v < 200:
            values.append(v)
    return max(values) if values else None


@dataclass(frozen=True)
class ProcessStats:
    cpu_percent: float  # of one core, daemon and trainer together
    rss_bytes: int  # daemon and trainer together
    trainer_rss_bytes: int


class Sensors:
    """Reads the device. ``minute_of_day`` uses local time, as the time windows do."""

    def __init__(self, *, zones_glob: str = THERMAL_ZONES,
                 hwmon: Callable[[], Mapping[str, Sequence[object]]] | None = None) -> None:
        self._zones_glob = zones_glob
        self._hwmon = hwmon or getattr(psutil, "sensors_temperatures", lambda: {})
        self._me = psutil.Process(os.getpid())
        self._me.cpu_percent(None)  # the first call only starts the measurement
        self._trainer: psutil.Process | None = None

    def temperature(self) -> float | None:
        try:
            groups = self._hwmon()
        except OSError as e:
            log.debug("hwmon unreadable: %s", e)
            groups = {}
        found = pick_temperature(groups)
        if found is not None:
            return found
        texts = []
        for path in sorted(glob.glob(self._zones_glob)):
            try:
                with open(path) as f:
                    texts.append(f.read(64))
            except OSError:
                continue
        return zone_temperature(texts)

    def battery(self) -> tuple[float | None, bool | None]:
        try:
            b = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        except OSError:
            b = None
        if b is None:
            return None, None
        return float(b.percent), (None if b.power_plugged is None else bool(b.power_plugged))

    def readings(self) -> Readings:
        percent, charging = self.battery()
        now = time.localtime()
        return Readings(temperature_c=self.temperature(), battery_percent=percent, charging=charging,
                        minute_of_day=now.tm_hour * 60 + now.tm_min)

    def follow_trainer(self, pid: int | None) -> None:
        if pid is None:
            self._trainer = None
            return
        try:
            self._trainer = psutil.Process(pid)
            self._trainer.cpu_percent(None)
        except psutil.Error:
            self._trainer = None

    def processes(self) -> ProcessStats:
        cpu = self._me.cpu_percent(None)
        rss = self._me.memory_info().rss
        trainer_rss = 0
        if self._trainer is not None:
            try:
                cpu += self._trainer.cpu_percent(None)
                trainer_rss = self._trainer.memory_info().rss
            except psutil.Error:
                self._trainer = None
        return ProcessStats(cpu_percent=cpu, rss_bytes=rss + trainer_rss, trainer_rss_bytes=trainer_rss)

    @staticmethod
    def memory_percent() -> float | None:
        try:
            return float(psutil.virtual_memory().percent)
        except OSError:
            return None
