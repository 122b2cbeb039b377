"""The messages between the daemon and its trainer child, typed, serialised in one place.

Both directions carry one JSON object per line; nothing is pickled. Every message is a frozen
dataclass; :func:`encode` writes it and the matching decoder reads it back strictly: a line that
is not JSON, names an unknown kind, lacks a field, carries an extra one or a value of the wrong
type raises :class:`~fednca_daemon.errors.TrainerProtocolError` naming what was wrong.

    daemon -> trainer (stdin):   a WorkerSpec, then one ChunkCommand per chunk; end of input = exit
    trainer -> daemon (a pipe):  TrainerReady, then one ChunkReport per chunk; TrainerFailed on error

On the wire an event is its fields plus ``"ev"`` (``ready``, ``chunk``, ``error``); a command
is its fields plus ``"op": "chunk"``; the spec is its fields, the data configuration nested
under ``"data"``.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

from .errors import TrainerProtocolError

MAX_LINE = 1 << 16
MAX_TEXT = 500  # an error message from the trainer is cut to this
TRAINERS = ("numpy", "torch")  # fednca.nptrain (no PyTorch), fednca.train (the reference)


@dataclass(frozen=True)
class PhantomSpec:
    site: int
    count: int
    seed: int


@dataclass(frozen=True)
class DataSpec:
    """Where the trainer finds the site's images: a folder, or phantom images (exactly one)."""

    folder: str | None = None
    phantom: PhantomSpec | None = None
    skip_bad: bool = False
    test_fraction: float = 0.0

    def __post_init__(self) -> None:
        if (self.folder is None) == (self.phantom is None):
            raise TrainerProtocolError("data: give exactly one of folder or phantom")

    @classmethod
    def from_config(cls, d: Any) -> "DataSpec":
        """From the daemon's validated ``DataConfig``."""
        phantom = None if d.phantom is None else PhantomSpec(site=d.phantom.site, count=d.phantom.count,
                                                             seed=d.phantom.seed)
        return cls(folder=None if d.folder is None else str(d.folder), phantom=phantom, skip_bad=d.skip_bad,
                   test_fraction=float(d.test_fraction))


@dataclass(frozen=True)
class WorkerSpec:
    """What a trainer needs to start; sent as its first line of input."""

    state_dir: str
    round: int
    federation: str
    coordinator_verify_key: str  # hex
    data: DataSpec
    threads: int = 1
    low_memory: bool = True
    seed: int = 0
    trainer: str = "numpy"  # one of TRAINERS: which implementation the child trains with

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise TrainerProtocolError(f"trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}"[:200])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "WorkerSpec":
        return _build(cls, _object(text, "trainer specification"), "trainer specification")


@dataclass(frozen=True)
class ChunkCommand:
    """Train for at most ``seconds``, checkpoint, report."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise TrainerProtocolError(f"a chunk needs a positive length, got {self.seconds!r}")


@dataclass(frozen=True)
class TrainerReady:
    """The trainer has loaded its data and resumed; ``cpu_s`` is what its start-up cost."""

    round: int
    steps: int
    planned: int
    samples: int
    cpu_s: float
    peak_rss: int = 0


@dataclass(frozen=True)
class ChunkReport:
    """One chunk done and checkpointed; ``steps`` and ``planned`` are the round's totals."""

    round: int
    steps: int
    planned: int
    samples: int
    chunk_steps: int
    chunk_samples: int
    loss: float | None
    cpu_s: float
    stopped: bool
    peak_rss: int = 0


@dataclass(frozen=True)
class TrainerFailed:
    """The trainer cannot go on; it exits right after this."""

    message: str
    peak_rss: int = 0


TrainerEvent = Union[TrainerReady, ChunkReport, TrainerFailed]
_EVENT_TAGS: dict[type, str] = {TrainerReady: "ready", ChunkReport: "chunk", TrainerFailed: "error"}
_EVENT_TYPES = {tag: cls for cls, tag in _EVENT_TAGS.items()}


def encode_event(event: TrainerEvent) -> bytes:
    return _line({"ev": _EVENT_TAGS[type(event)], **asdict(event)})


def decode_event(line: bytes) -> TrainerEvent:
    body = _object(line, "trainer message")
    cls = _EVENT_TYPES.get(body.pop("ev", None))  # type: ignore[arg-type]
    if cls is None:
        raise TrainerProtocolError(f"trainer sent an unknown message: {bytes(line[:80])!r}")
    event = _build(cls, body, f"trainer message {_EVENT_TAGS[cls]!r}")
    if isinstance(event, TrainerFailed) and len(event.message) > MAX_TEXT:
        event = TrainerFailed(message=event.message[:MAX_TEXT], peak_rss=event.peak_rss)
    return event


def encode_command(command: ChunkCommand) -> bytes:
    return _line({"op": "chunk", **asdict(command)})


def decode_command(line: bytes) -> ChunkCommand:
    body = _object(line, "command from the daemon")
    if body.pop("op", None) != "chunk":
        raise TrainerProtocolError(f"unknown command from the daemon: {bytes(line[:80])!r}")
    return _build(ChunkCommand, body, "command from the daemon")


# ----------------------------------------------------------------------------- strict decoding


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, allow_nan=False).encode() + b"\n"


def _object(text: str | bytes, what: str) -> dict[str, Any]:
    if len(text) > MAX_LINE:
        raise TrainerProtocolError(f"{what}: longer than {MAX_LINE} bytes")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise TrainerProtocolError(f"{what} is not JSON: {text[:80]!r}") from None
    if not isinstance(body, dict):
        raise TrainerProtocolError(f"{what} is not a JSON object: {text[:80]!r}")
    return body


def _build(cls: type, body: Any, what: str) -> Any:
    """``cls(**body)`` after checking that the keys are exactly the fields and each value has
    the field's type (nested dataclasses are built the same way)."""
    if not isinstance(body, dict):
        raise TrainerProtocolError(f"{what}: expected an object, got {type(body).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise TrainerProtocolError(f"{what}: unknown field(s) {', '.join(map(str, unknown))}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in body:
            values[f.name] = _value(hints[f.name], body[f.name], f"{what}: {f.name}")
        elif f.default is f.default_factory:  # both MISSING: a required field
            raise TrainerProtocolError(f"{what}: missing field {f.name}")
    try:
        return cls(**values)
    except TrainerProtocolError as e:
        raise TrainerProtocolError(f"{what}: {e}") from None


def _value(hint: Any, v: Any, where: str) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if v is None:
        if type(None) in options:
            return None
        raise TrainerProtocolError(f"{where}: must not be null")
    for t in options:
        if t is bool and isinstance(v, bool):
            return v
        if t is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        if t is float and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
        if t is str and isinstance(v, str):
            return v
        if isinstance(t, type) and hasattr(t, "__dataclass_fields__") and isinstance(v, dict):
            return _build(t, v, where)
    raise TrainerProtocolError(f"{where}: unexpected value {v!r}"[:200])
