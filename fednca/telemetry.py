"""The status message a site publishes on ``status/<site>`` (retained, QoS 1): one definition,
serialised in one place, read back by one strict parser.

The daemon builds it; the coordinator, ``fednca status`` and the fleet view read it. Telemetry is
a peer's word, so :func:`parse_status` trusts nothing: a payload over :data:`MAX_BYTES`, not
UTF-8 JSON (duplicate keys, NaN and Infinity refused), of another message version, with a missing
or extra field, a value of the wrong type, a string over its bound or a number out of its range
raises :class:`TelemetryError`; no other exception escapes it. A message that parses is exactly
what :meth:`StatusMessage.to_json` would have written.

The last will on the same topic is the plain word :data:`OFFLINE` (not JSON); a daemon that stops
cleanly publishes a last message with state ``stopped`` instead.

Fields on the wire, in this order: ``v`` (message version), ``site``, ``version`` (software),
``time`` (unix seconds), ``state`` (one of :data:`STATES`), ``round``, ``steps``, ``planned``,
``progress`` (0..1), ``samples_per_s`` and ``chunk_s`` (of the last chunk), ``gates`` (why
paused), ``cpu_percent`` (daemon and trainer, of one core), ``rss_mb`` (daemon and trainer),
``memory_percent`` (system), ``temperature_c``, ``battery_percent``, ``charging``,
``bytes_sent``, ``bytes_received``, ``outbox`` (updates waiting for a receipt),
``last_receipt``, ``error``, and ``clock_offset_s`` (the device's wall clock minus the
coordinator's, in whole seconds, as measured on the freshest round announcement received live;
written only once known, and read as unknown when absent, so status of daemons that predate it
still parses), then the link: ``reconnects`` (connections to the broker made again since the
daemon started) and ``rtt_ms`` (PUBLISH to PUBACK of its last QoS 1 message, in whole ms),
optional in the same way.

Compatibility: the coordinator keeps any JSON object a site sends as its status (it decides nothing
from it), so adding an optional field costs an older coordinator nothing; a reader built on this
parser reads status without the optional fields as unknown.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from .errors import FedNCAError

MESSAGE_VERSION = 1
MAX_BYTES = 2048
MAX_TEXT = 160  # characters of any free text (version, gate reason, receipt reason, error)
MAX_GATES = 4
OFFLINE = b"offline"
STATES = ("idle", "training", "paused", "backoff", "submitted", "stopping", "stopped")
_SITE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # a site id, as fednca.topics checks it
_COUNT = 2**53  # integers above this lose precision in JavaScript readers; no real counter gets there
_TIME = 2**40  # unix seconds, far beyond any device's clock
_BIG = 1e12  # bound of measured rates, durations and sizes
_RTT_MS = 86_400_000  # a day: a longer PUBLISH-to-PUBACK time is reported as unknown
_OFFSET = 10**9  # seconds (about 32 years) either way: a clock further off is reported as unknown
_OPTIONAL = frozenset({"clock_offset_s", "reconnects", "rtt_ms"})  # absent on the wire means None


class TelemetryError(FedNCAError):
    """A status payload is not a status message; the message says what is wrong with it."""


@dataclass(frozen=True)
class StatusMessage:
    """One site's telemetry, as it travels. Build it through the producer
    (the edge daemon's telemetry), which rounds numbers and cuts texts to these bounds."""

    site: str
    version: str | None
    time: int
    state: str
    round: int | None
    steps: int
    planned: int | None
    progress: float | None
    samples_per_s: float | None
    chunk_s: float | None
    gates: tuple[str, ...]
    cpu_percent: float | None
    rss_mb: float | None
    memory_percent: float | None
    temperature_c: float | None
    battery_percent: float | None
    charging: bool | None
    bytes_sent: int
    bytes_received: int
    outbox: int
    last_receipt: str | None
    error: str | None
    clock_offset_s: int | None = None
    reconnects: int | None = None
    rtt_ms: int | None = None
    v: int = MESSAGE_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f.name, getattr(self, f.name))

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"v": self.v}
        for f in fields(self):
            if f.name != "v" and not (f.name in _OPTIONAL and getattr(self, f.name) is None):
                value = getattr(self, f.name)
                body[f.name] = list(value) if isinstance(value, tuple) else value
        out = json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
        if len(out) > MAX_BYTES:  # cannot happen within the field bounds; a bug if it does
            raise AssertionError("telemetry grew past its bound")
        return out


def parse_status(payload: bytes) -> StatusMessage:
    """The status message in ``payload``, or :class:`TelemetryError`."""
    if not isinstance(payload, (bytes, bytearray)):
        raise TelemetryError("not bytes")
    if len(payload) > MAX_BYTES:
        raise TelemetryError(f"larger than {MAX_BYTES} bytes")
    try:
        body = json.loads(bytes(payload).decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TelemetryError(f"not UTF-8 JSON ({str(e)[:60]})") from None
    if not isinstance(body, dict):
        raise TelemetryError("not a JSON object")
    if body.get("v") != MESSAGE_VERSION or isinstance(body.get("v"), bool):
        raise TelemetryError(f"message version {str(body.get('v'))[:16]!r} is not {MESSAGE_VERSION}")
    names = [f.name for f in fields(StatusMessage)]
    missing = [n for n in names if n not in body and n not in _OPTIONAL]
    extra = sorted(str(k)[:32] for k in body if k not in names)
    if missing or extra:
        raise TelemetryError("fields: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])))
    values = dict(body)
    if isinstance(values["gates"], list):
        values["gates"] = tuple(values["gates"])
    return StatusMessage(**values)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:32]!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"constant {name} is not allowed")


# ---------------------------------------------------------------------------- field bounds


def _text(value: Any, *, optional: bool = True) -> bool:
    return (value is None and optional) or (isinstance(value, str) and len(value) <= MAX_TEXT)


def _int(value: Any, low: int, high: int, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return type(value) is int and low <= value <= high


def _num(value: Any, low: float, high: float) -> bool:
    if value is None:
        return True
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


_CHECKS = {
    "v": lambda x: _int(x, MESSAGE_VERSION, MESSAGE_VERSION),
    "site": lambda x: isinstance(x, str) and _SITE.fullmatch(x) is not None,
    "version": _text,
    "time": lambda x: _int(x, 0, _TIME),
    "state": lambda x: isinstance(x, str) and x in STATES,
    "round": lambda x: _int(x, 0, _COUNT, optional=True),
    "steps": lambda x: _int(x, 0, _COUNT),
    "planned": lambda x: _int(x, 0, _COUNT, optional=True),
    "progress": lambda x: _num(x, 0.0, 1.0),
    "samples_per_s": lambda x: _num(x, 0.0, _BIG),
    "chunk_s": lambda x: _num(x, 0.0, _BIG),
    "gates": lambda x: (isinstance(x, tuple) and len(x) <= MAX_GATES
                        and all(_text(g, optional=False) for g in x)),
    "cpu_percent": lambda x: _num(x, 0.0, 100.0 * 4096),
    "rss_mb": lambda x: _num(x, 0.0, _BIG),
    "memory_percent": lambda x: _num(x, 0.0, 100.0),
    "temperature_c": lambda x: _num(x, -273.2, 1000.0),
    "battery_percent": lambda x: _num(x, 0.0, 100.0),
    "charging": lambda x: x is None or isinstance(x, bool),
    "bytes_sent": lambda x: _int(x, 0, _COUNT),
    "bytes_received": lambda x: _int(x, 0, _COUNT),
    "outbox": lambda x: _int(x, 0, _COUNT),
    "last_receipt": _text,
    "error": _text,
    "clock_offset_s": lambda x: x is None or (type(x) is int and -_OFFSET <= x <= _OFFSET),
    "reconnects": lambda x: _int(x, 0, _COUNT, optional=True),
    "rtt_ms": lambda x: _int(x, 0, _RTT_MS, optional=True),
}


def _check(name: str, value: Any) -> None:
    if not _CHECKS[name](value):
        raise TelemetryError(f"{name}: {str(value)[:40]!r} is not allowed here")


def within_bounds(name: str, value: Any) -> Any:
    """``value`` if the field ``name`` may hold it, else None: for a producer whose sensor reads
    something absurd (a measured number is dropped rather than the whole message)."""
    return value if _CHECKS[name](value) else None
