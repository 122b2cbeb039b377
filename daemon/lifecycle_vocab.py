"""The words of the daemon's lifecycle: its state, the events the shell feeds it and the actions
it asks the shell to perform. The decisions themselves are :mod:`.lifecycle`.

Everything here is a frozen dataclass or an enum: the shell and the tests build events by type,
never by string, and the machine dispatches on their type.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Union


class Worker(StrEnum):
    """Where the trainer child stands: the axis of the lifecycle's transition table."""

    NONE = "none"
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"  # a chunk is running
    STOPPING = "stopping"  # asked to exit


class Phase(StrEnum):
    IDLE = "idle"  # no round needing work
    TRAINING = "training"
    PAUSED = "paused"  # a gate is closed
    BACKOFF = "backoff"  # the trainer failed; waiting before the next try
    SUBMITTED = "submitted"  # update stored and sent, waiting for its receipt
    STOPPING = "stopping"


@dataclass(frozen=True)
class Policy:
    chunk_s: float
    min_steps: int
    deadline_margin_s: float
    duty_cycle: float
    threads: int = 1
    resend_s: float = 900.0
    backoff_s: float = 10.0


@dataclass(frozen=True)
class RoundInfo:
    round: int
    deadline: float
    model_sha256: str
    max_staleness: int = 0  # buffered asynchronous rounds: updates this many rounds back still count

    def keeps(self, round: int) -> bool:
        """Whether an update trained for ``round`` may still be counted while this round is open."""
        return round >= self.round - self.max_staleness


@dataclass(frozen=True)
class Pending:
    """A stored update waiting for its receipt."""

    round: int
    update_id: str
    sent_at: float
    resends: int = 0  # published again this many times without a receipt
    # Buffered rounds: refused as ``duplicate_site`` (the buffer already counts another update of
    # this site), so it waits for the next model, when it counts in the next buffer; never lost.
    held: bool = False


@dataclass(frozen=True)
class State:
    policy: Policy
    round: RoundInfo | None = None  # the newest verified announcement
    done_round: int = -1  # rounds up to this one need no more work
    outbox: tuple[Pending, ...] = ()
    worker: Worker = Worker.NONE
    worker_round: int | None = None
    steps: int = 0  # optimiser steps done in the current round
    planned: int | None = None  # steps planned for it; None until a trainer (or checkpoint) said
    rest_until: float | None = None
    rest_s: float = 0.0
    gates_open: bool = True
    gate_reasons: tuple[str, ...] = ()
    failures: int = 0  # trainer failures in a row
    error: str | None = None
    submitting: bool = False
    stopping: bool = False
    exited: bool = False
    last_receipt: str | None = None  # "accepted" or the reason code of the last receipt

    @property
    def needs_work(self) -> bool:
        r = self.round
        return (r is not None and r.round > self.done_round
                and not any(p.round == r.round for p in self.outbox))

    @property
    def phase(self) -> Phase:
        if self.stopping:
            return Phase.STOPPING
        if self.round is not None and any(p.round == self.round.round for p in self.outbox):
            return Phase.SUBMITTED
        if not self.needs_work:
            return Phase.IDLE
        if not self.gates_open:
            return Phase.PAUSED
        if self.failures and self.worker == Worker.NONE:
            return Phase.BACKOFF
        return Phase.TRAINING

    @property
    def may_ping_watchdog(self) -> bool:
        """False while a trainer is starting or running a chunk: a hung trainer stops the pings."""
        return self.worker not in (Worker.STARTING, Worker.BUSY)


# -------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Announced:
    round: int
    deadline: float
    model_sha256: str
    max_staleness: int = 0  # announced by a coordinator running buffered asynchronous rounds


@dataclass(frozen=True)
class GatesChanged:
    open: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerReady:
    round: int
    steps: int
    planned: int
    cpu_s: float
    wall_s: float


@dataclass(frozen=True)
class ChunkDone:
    round: int
    steps: int
    planned: int
    cpu_s: float
    wall_s: float


@dataclass(frozen=True)
class WorkerExited:
    error: str | None = None  # None: it exited when asked, or cleanly


@dataclass(frozen=True)
class UpdateStored:
    round: int
    update_id: str


@dataclass(frozen=True)
class SubmitFailed:
    error: str


@dataclass(frozen=True)
class UpdateLost:
    """A stored update's file was found damaged (and moved aside): it can never be sent."""

    round: int
    update_id: str
    error: str


@dataclass(frozen=True)
class ReceiptArrived:
    round: int
    update_id: str
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class StopRequested:
    pass


Event = Union[Announced, GatesChanged, WorkerReady, ChunkDone, WorkerExited, UpdateStored, SubmitFailed,
              UpdateLost, ReceiptArrived, Tick, StopRequested]

# ------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartWorker:
    round: int


@dataclass(frozen=True)
class RunChunk:
    seconds: float


@dataclass(frozen=True)
class StopWorker:
    interrupt: bool  # True: end the running chunk now; False: the trainer is idle, let it exit


@dataclass(frozen=True)
class Submit:
    round: int
    partial: bool


@dataclass(frozen=True)
class Publish:
    """Publish a stored update (again)."""

    round: int
    update_id: str


@dataclass(frozen=True)
class DropUpdate:
    round: int
    update_id: str


@dataclass(frozen=True)
class SaveDone:
    round: int
    result: str  # "accepted" or a reason code


@dataclass(frozen=True)
class PingWatchdog:
    pass


@dataclass(frozen=True)
class Telemetry:
    pass


@dataclass(frozen=True)
class Exit:
    pass


Action = Union[StartWorker, RunChunk, StopWorker, Submit, Publish, DropUpdate, SaveDone, PingWatchdog, Telemetry,
               Exit]

PAST_DEADLINE = "past_deadline"  # the result of a round announced after its deadline
DEADLINE_RESOLUTION_S = 1.0  # deadlines travel as whole seconds, rounded up
RESEND_MIN_S = 30.0  # the shortest wait for a receipt before an update is published again
RESEND_FRACTION = 0.1  # of the time the round had left when the update was sent
