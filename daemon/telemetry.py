"""Telemetry, the producer's side: the daemon's :class:`Snapshot` becomes the status message.

The message itself (its fields, bounds, serialisation and the strict parser every reader uses)
is :class:`fednca.telemetry.StatusMessage`; this module only fills it from the daemon's state.
Built by pure functions: numbers rounded (a measured value out of its field's range is dropped,
not sent), texts cut to :data:`~fednca.telemetry.MAX_TEXT` characters on one line, at most
:data:`~fednca.telemetry.MAX_GATES` gate reasons; the whole message stays under
:data:`~fednca.telemetry.MAX_BYTES`. The last will on the same topic is the plain word
``offline``; a daemon that stops cleanly publishes its final status with state ``stopped``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fednca.telemetry import MAX_BYTES, MAX_GATES, MAX_TEXT, OFFLINE, StatusMessage, within_bounds

__all__ = ["MAX_BYTES", "OFFLINE", "Snapshot", "progress", "status_json", "status_line", "status_message"]


@dataclass(frozen=True)
class Snapshot:
    """What the daemon knows about itself at one moment, in its own units."""

    site: str
    version: str
    time: float
    state: str
    round: int | None = None
    steps: int = 0
    planned: int | None = None
    samples_per_s: float | None = None
    chunk_s: float | None = None
    gates: tuple[str, ...] = ()
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    memory_percent: float | None = None
    temperature_c: float | None = None
    battery_percent: float | None = None
    charging: bool | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    outbox: int = 0
    last_receipt: str | None = None
    error: str | None = None
    clock_offset_s: float | None = None  # this device's wall clock minus the coordinator's
    reconnects: int | None = None  # connections to the broker made again since the daemon started
    rtt_s: float | None = None  # PUBLISH to PUBACK of the last QoS 1 message (None: not measured yet)


def _num(name: str, v: float | None, digits: int = 1) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return within_bounds(name, round(float(v), digits))


def _text(v: str | None) -> str | None:
    if v is None:
        return None
    v = " ".join(str(v).split())
    return v if len(v) <= MAX_TEXT else v[: MAX_TEXT - 1] + "…"


def progress(steps: int, planned: int | None) -> float | None:
    if not planned:
        return None
    return round(min(max(steps / planned, 0.0), 1.0), 3)


def status_message(s: Snapshot) -> StatusMessage:
    return StatusMessage(
        site=s.site,
        version=_text(s.version),
        time=int(s.time),
        state=s.state,
        round=s.round,
        steps=s.steps,
        planned=s.planned,
        progress=progress(s.steps, s.planned),
        samples_per_s=_num("samples_per_s", s.samples_per_s, 2),
        chunk_s=_num("chunk_s", s.chunk_s, 2),
        gates=tuple(_text(g) or "" for g in s.gates[:MAX_GATES]),
        cpu_percent=_num("cpu_percent", s.cpu_percent),
        rss_mb=_num("rss_mb", None if s.rss_bytes is None else s.rss_bytes / 2**20),
        memory_percent=_num("memory_percent", s.memory_percent),
        temperature_c=_num("temperature_c", s.temperature_c),
        battery_percent=_num("battery_percent", s.battery_percent, 0),
        charging=s.charging,
        bytes_sent=int(s.bytes_sent),
        bytes_received=int(s.bytes_received),
        outbox=int(s.outbox),
        last_receipt=_text(s.last_receipt),
        error=_text(s.error),
        clock_offset_s=_offset(s.clock_offset_s),
        reconnects=None if s.reconnects is None else within_bounds("reconnects", int(s.reconnects)),
        rtt_ms=_rtt_ms(s.rtt_s),
    )


def _rtt_ms(v: float | None) -> int | None:
    if v is None or not math.isfinite(v) or v < 0:
        return None
    return within_bounds("rtt_ms", int(round(v * 1000)))


def _offset(v: float | None) -> int | None:
    if v is None or not math.isfinite(v):
        return None
    return within_bounds("clock_offset_s", int(round(v)))


def status_json(s: Snapshot) -> bytes:
    return status_message(s).to_json()


def status_line(s: Snapshot) -> str:
    """One line for systemd's STATUS=, e.g. ``training round 7: 120/300 steps (40%), 3.1 samples/s``."""
    where = f" round {s.round}" if s.round is not None else ""
    line = f"{s.state}{where}"
    if s.state in ("training", "paused", "backoff") and s.planned:
        line += f": {s.steps}/{s.planned} steps ({100 * (progress(s.steps, s.planned) or 0):.0f}%)"
        if s.samples_per_s:
            line += f", {s.samples_per_s:.1f} samples/s"
    if s.gates:
        line += f"; paused for {', '.join(s.gates)}"
    if s.state == "submitted":
        line += ": update sent, waiting for its receipt"
    if s.state == "idle" and s.last_receipt:
        line += f" (last update: {s.last_receipt})"
    if s.outbox:
        line += f"; outbox {s.outbox}"
    if s.error:
        line += f"; error: {_text(s.error)}"
    return line
