"""What goes into the round policy (events) and what comes out of it (actions).

The coordinator's shell turns MQTT messages, operator commands and clock ticks into events, hands
each to :func:`.rounds.handle`, and performs the actions it gets back in the order given. These
are plain values: the policy never performs anything, and a test can drive it with events and
compare the actions it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from fednca.rounds_vocab import CloseReason, Reason, RejectReason, Verdict

from .round_state import AcceptedUpdate, RoundConfig, RoundState
from .roundlog import LogRecord, encode

# Events -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateVerified:
    """An update the wire codec unsealed and authenticated as coming from ``site``."""

    site: str
    update_id: str
    round: int
    base_sha256: str
    samples: int
    steps: int
    partial: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)  # the site's own measurements, for the log


@dataclass(frozen=True)
class UpdateRejected:
    """An update the wire codec refused (bad signature, oversized, malformed...): ``reason`` is its code."""

    site: str  # from the topic: unauthenticated
    update_id: str | None
    reason: Reason
    round: int | None = None  # when the codec could read it


@dataclass(frozen=True)
class Tick:
    """Time has passed; nothing else happened."""


@dataclass(frozen=True)
class SiteEnrolled:
    site: str


@dataclass(frozen=True)
class SiteRevoked:
    site: str


@dataclass(frozen=True)
class OpenRound:
    """Open the next round (the previous one must be closed). Defaults: now + round_s, same config."""

    round: int
    model_sha256: str
    deadline: float | None = None
    config: RoundConfig | None = None


Event = Union[UpdateVerified, UpdateRejected, Tick, SiteEnrolled, SiteRevoked, OpenRound]

# Actions, performed by the shell in the order given ------------------------------------------------


@dataclass(frozen=True)
class StoreUpdate:
    """Write the payload of the update being handled durably, before anything else."""

    round: int
    site: str
    update_id: str


@dataclass(frozen=True)
class SaveState:
    """Write ``state`` atomically; comes before any Ack."""

    state: RoundState


@dataclass(frozen=True)
class Ack:
    """Acknowledge the update message being handled to the broker (QoS 1 PUBACK)."""

    site: str
    update_id: str | None


@dataclass(frozen=True)
class SendReceipt:
    """A signed receipt to ``site``: ``reason`` is ``Verdict.ACCEPTED`` or the code of the refusal."""

    site: str
    update_id: str | None
    round: int
    accepted: bool
    reason: Verdict | RejectReason


@dataclass(frozen=True)
class LogEvent:
    """A line for the round log and the ``events`` topic."""

    record: LogRecord

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def fields(self) -> dict[str, Any]:
        """The line's JSON fields other than ``kind``."""
        return {k: v for k, v in encode(self.record).items() if k != "kind"}


@dataclass(frozen=True)
class Announce:
    """Publish the (retained) round announcement: on opening, and again when the deadline moves."""

    round: int
    model_sha256: str
    deadline: float
    quorum: int


@dataclass(frozen=True)
class CloseRound:
    """Aggregate these updates, in this order, into the next global model."""

    round: int
    reason: CloseReason
    accepted: tuple[AcceptedUpdate, ...]


Action = Union[StoreUpdate, SaveState, Ack, SendReceipt, LogEvent, Announce, CloseRound]
