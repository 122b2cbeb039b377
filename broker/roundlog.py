"""The round log's records: one typed definition per kind of line, and their JSON form.

The round log (``rounds.jsonl`` in the store) and the ``events`` topic say what happened in a
federation, one JSON object per event: ``{"kind": "round_closed", "at": ..., "round": 3, ...}``.
Each kind is one frozen dataclass below; the policy and the coordinator build these, the store
writes and reads them back, and readers (the demo, the fleet views) get the same types back
instead of dicts whose keys a typo could miss.

:func:`encode` and :func:`decode` are the one place a record becomes JSON and back: the store
calls them for the log file and the coordinator's publisher for the ``events`` topic. The spelling
of every line is the one written before records were typed: tuples are JSON lists, codes are
their strings, and ``recovered`` appears only on a line that a restart wrote in place of one a
crash kept out.

A record also answers ``record["field"]`` and ``record.get("field")`` with the JSON value of that
field (``"kind"`` included), for tools that treat the log as the JSON lines it is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from fednca.rounds_vocab import CloseReason, RejectReason, RoundReason, RoundStatus, reject_reason


def _numbers(value: Any) -> dict[str, float]:
    """A metrics mapping: string names to finite numbers (a site's word, bounded by the wire codec)."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) for k, v in value.items()
    ):
        raise TypeError(f"must be an object of finite numbers, got {value!r}")
    return {k: float(v) for k, v in value.items()}


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"must be a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class LogRecord:
    """One line of the round log. ``at`` is the clock reading (seconds since the epoch) it is about."""

    KIND: ClassVar[str] = ""
    # field -> the function that brings a decoded JSON value (or a caller's list) to the field's type
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}

    at: float

    def __post_init__(self) -> None:
        for name, coerce in self._COERCE.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, coerce(value))

    @property
    def kind(self) -> str:
        return self.KIND

    def __getitem__(self, key: str) -> Any:
        return encode(self)[key]

    def get(self, key: str, default: Any = None) -> Any:
        return encode(self).get(key, default)


@dataclass(frozen=True, kw_only=True)
class RoundOpenedRecord(LogRecord):
    KIND: ClassVar[str] = "round_opened"
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"enrolled": _strings}
    round: int
    model_sha256: str
    deadline: float
    quorum: int
    enrolled: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class DeadlineExtendedRecord(LogRecord):
    KIND: ClassVar[str] = "deadline_extended"
    round: int
    previous_deadline: float
    deadline: float
    accepted: int
    quorum: int
    why: str


@dataclass(frozen=True, kw_only=True)
class UpdateAcceptedRecord(LogRecord):
    KIND: ClassVar[str] = "update_accepted"
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"metrics": _numbers}
    round: int
    site: str
    update_id: str
    samples: int
    steps: int
    partial: bool
    recovered: bool = False  # written on a restart: the crash came between the state save and the log
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)  # the site's own word (e.g. test Dice)
    staleness: int = 0  # buffered rounds: model versions between the one it trained from and this round's


@dataclass(frozen=True, kw_only=True)
class UpdateRedeliveredRecord(LogRecord):
    KIND: ClassVar[str] = "update_redelivered"
    round: int
    site: str
    update_id: str


@dataclass(frozen=True, kw_only=True)
class UpdateRejectedRecord(LogRecord):
    KIND: ClassVar[str] = "update_rejected"
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"reason": reject_reason}
    round: int  # the round open (or last closed) when it came
    site: str  # from the topic: unauthenticated when the codec refused it
    update_id: str | None
    update_round: int  # the round the update named, else the current round
    reason: RejectReason


@dataclass(frozen=True, kw_only=True)
class UpdateDroppedRecord(LogRecord):
    KIND: ClassVar[str] = "update_dropped"
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"reason": RoundReason}
    round: int
    site: str
    update_id: str
    reason: RoundReason


@dataclass(frozen=True, kw_only=True)
class SiteEnrolledRecord(LogRecord):
    KIND: ClassVar[str] = "site_enrolled"
    round: int
    site: str


@dataclass(frozen=True, kw_only=True)
class SiteRevokedRecord(LogRecord):
    KIND: ClassVar[str] = "site_revoked"
    round: int
    site: str


@dataclass(frozen=True, kw_only=True)
class RoundClosedRecord(LogRecord):
    KIND: ClassVar[str] = "round_closed"
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"reason": CloseReason, "sites": _strings}
    round: int
    reason: CloseReason
    sites: tuple[str, ...]  # in acceptance order, the order the round is aggregated in
    samples: int
    extensions: int
    recovered: bool = False  # written on a restart: the crash came between the state save and the log


@dataclass(frozen=True, kw_only=True)
class RoundAggregatedRecord(LogRecord):
    KIND: ClassVar[str] = "round_aggregated"
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"reason": CloseReason, "sites": _strings,
                                                             "metrics_mean": _numbers}
    round: int  # the round aggregated; its result is the model of round + 1
    reason: CloseReason
    sites: tuple[str, ...]
    samples: int
    method: str
    clip_norm: float | None
    model_sha256: str
    model_bytes: int
    seconds: float
    model_kept: str | None = None  # why the previous model was kept instead of the aggregate
    # per metric name, the mean over the sites aggregated that reported it (dice_global: the test
    # Dice of this round's model on the sites' held-out images, as the sites measured it)
    metrics_mean: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelRolledBackRecord(LogRecord):
    KIND: ClassVar[str] = "model_rolled_back"
    round: int  # the new round, opened with the earlier model
    from_round: int  # the round that was current (abandoned when it was open)
    to_round: int  # the round whose stored model the new round trains from
    model_sha256: str
    abandoned: int  # accepted updates of the abandoned round


@dataclass(frozen=True, kw_only=True)
class FederationFinishedRecord(LogRecord):
    KIND: ClassVar[str] = "federation_finished"
    round: int  # the last round aggregated
    model_sha256: str  # the final model


@dataclass(frozen=True, kw_only=True)
class CoordinatorResumedRecord(LogRecord):
    KIND: ClassVar[str] = "coordinator_resumed"
    _COERCE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"status": RoundStatus}
    round: int
    status: RoundStatus
    accepted: int
    uncounted: int  # update files of the round that the saved state does not count


@dataclass(frozen=True, kw_only=True)
class MessageDroppedRecord(LogRecord):
    KIND: ClassVar[str] = "message_dropped"
    topic: str
    bytes: int
    why: str


@dataclass(frozen=True, kw_only=True)
class SiteThrottledRecord(LogRecord):
    KIND: ClassVar[str] = "site_throttled"
    site: str  # from the topic (the broker's ACL confines a site to its own)
    topic: str  # the kind of topic: "updates" or "status"
    bytes: int  # the size of the message that found the site's budget spent
    refused: int = 1  # the site's messages refused since the coordinator started


@dataclass(frozen=True, kw_only=True)
class LinesSuppressedRecord(LogRecord):
    KIND: ClassVar[str] = "lines_suppressed"
    line_kind: str  # the kind of the lines left out
    site: str
    reason: str = ""  # their reason code, when the kind has one
    count: int  # lines left out since ``since``
    since: float  # when the first of them would have been written


KINDS: dict[str, type[LogRecord]] = {
    cls.KIND: cls
    for cls in (
        RoundOpenedRecord, DeadlineExtendedRecord, UpdateAcceptedRecord, UpdateRedeliveredRecord,
        UpdateRejectedRecord, UpdateDroppedRecord, SiteEnrolledRecord, SiteRevokedRecord, RoundClosedRecord,
        RoundAggregatedRecord, FederationFinishedRecord, CoordinatorResumedRecord, MessageDroppedRecord,
        ModelRolledBackRecord, SiteThrottledRecord, LinesSuppressedRecord,
    )
}  # fmt: skip

# Fields written only when they differ from this value, as lines have been spelt from the start.
_OMITTED_WHEN: dict[str, Any] = {"recovered": False, "model_kept": None, "metrics": {}, "metrics_mean": {},
                                  "staleness": 0}


_NAMES: dict[type, tuple[str, ...]] = {}  # each record class's field names, looked up once
_PLAIN = (str, int, float, bool, type(None))


def encode(record: LogRecord) -> dict[str, Any]:
    """The record as the JSON object of its log line (plain strings, lists, numbers)."""
    names = _NAMES.get(type(record))
    if names is None:
        names = _NAMES[type(record)] = tuple(f.name for f in dataclasses.fields(record))
    data: dict[str, Any] = {"kind": record.KIND}
    for name in names:
        value = getattr(record, name)
        if name in _OMITTED_WHEN and value == _OMITTED_WHEN[name]:
            continue
        if isinstance(value, tuple):
            value = list(value)
        elif not isinstance(value, _PLAIN) and isinstance(value, Mapping):
            value = dict(value)
        data[name] = value
    return data


def decode(data: Any) -> LogRecord:
    """The record a log line's JSON object holds; ValueError names what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    cls = KINDS.get(data.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown kind {data.get('kind')!r}")
    values = {k: v for k, v in data.items() if k != "kind"}
    try:
        return cls(**values)
    except TypeError as e:  # a missing or unknown field, or a list that is not of strings
        raise ValueError(f"{cls.KIND}: {e}") from None
