"""Telemetry: the JSON status a site publishes on ``status/<site>`` (retained, QoS 1).

Built by a pure function from a :class:`Snapshot`; small and bounded (strings are cut, numbers
rounded; the whole message stays under :data:`MAX_BYTES`). The last will on the same topic is
the plain word ``offline``; a daemon that stops cleanly publishes its final status with state
``stopped`` instead.

Fields: ``v`` (message version), ``site``, ``version`` (software), ``time`` (unix seconds),
``state`` (idle, training, paused, backoff, submitted, stopping, stopped), ``round``,
``steps``, ``planned``, ``progress`` (0..1), ``samples_per_s`` and ``chunk_s`` (of the last
chunk), ``gates`` (why paused), ``cpu_percent`` (daemon and trainer, of one core),
``rss_mb`` (daemon and trainer), ``memory_percent`` (system), ``temperature_c``,
``battery_percent``, ``charging``, ``bytes_sent``, ``bytes_received``, ``outbox``
(updates waiting for a receipt), ``last_receipt``, ``error``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MESSAGE_VERSION = 1
MAX_BYTES = 2048
MAX_TEXT = 160
OFFLINE = b"offline"


@dataclass(frozen=True)
class Snapshot:
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


def _num(v: float | None, digits: int = 1) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), digits)


def _text(v: str | None) -> str | None:
    if v is None:
        return None
    v = " ".join(str(v).split())
    return v if len(v) <= MAX_TEXT else v[: MAX_TEXT - 1] + "…"


def progress(steps: int, planned: int | None) -> float | None:
    if not planned:
        return None
    return round(min(max(steps / planned, 0.0), 1.0), 3)


def status_json(s: Snapshot) -> bytes:
    body = {
        "v": MESSAGE_VERSION,
        "site": s.site,
        "version": _text(s.version),
        "time": int(s.time),
        "state": s.state,
        "round": s.round,
        "steps": s.steps,
        "planned": s.planned,
        "progress": progress(s.steps, s.planned),
        "samples_per_s": _num(s.samples_per_s, 2),
        "chunk_s": _num(s.chunk_s, 2),
        "gates": [_text(g) for g in s.gates[:4]],
        "cpu_percent": _num(s.cpu_percent),
        "rss_mb": _num(None if s.rss_bytes is None else s.rss_bytes / 2**20),
        "memory_percent": _num(s.memory_percent),
        "temperature_c": _num(s.temperature_c),
        "battery_percent": _num(s.battery_percent, 0),
        "charging": s.charging,
        "bytes_sent": int(s.bytes_sent),
        "bytes_received": int(s.bytes_received),
        "outbox": int(s.outbox),
        "last_receipt": _text(s.last_receipt),
        "error": _text(s.error),
    }
    out = json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    assert len(out) <= MAX_BYTES, "telemetry grew past its bound"
    return out


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
