"""The daemon's lifecycle as a pure state machine: ``handle(state, event, now) -> (state, actions)``.

The shell (:mod:`fednca_daemon.service`) turns MQTT messages, trainer messages, sensor readings,
signals and the clock into events and performs the returned actions in order. ``now`` is
wall-clock seconds (the round deadline is wall-clock); nothing here reads a clock or a file.

Invariants:

1. A round needs work while it is newer than ``done_round`` and no stored update of it waits
   in the outbox. Only then does a trainer run; otherwise it is asked to exit, so an idle
   daemon holds no trainer (and no PyTorch).
2. At most one trainer, for the current round; a trainer of an older round is interrupted.
3. A chunk is started only while every gate is open, no rest is due and the trainer is idle.
   After each chunk (and after the trainer's start-up) the daemon rests as the CPU budget says.
4. An update is submitted once per round: when the planned steps are done, or at the deadline
   (less the margin) when at least ``min_steps`` were done. Below that it keeps training: the
   coordinator extends a round that lacks its quorum. A round that arrives after its deadline
   (the final model of a finished federation) is not trained at all.
5. A stored update leaves the outbox only after its receipt was saved as ``done_round`` (so a
   crash between the two never trains the round again), or when a newer round opens.
6. Stopping interrupts a running chunk, waits for the trainer to exit, then emits ``Exit``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Union

from .budget import backoff_seconds, rest_seconds
from .errors import IllegalTransition


class Worker(StrEnum):
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


@dataclass(frozen=True)
class Pending:
    """A stored update waiting for its receipt."""

    round: int
    update_id: str
    sent_at: float


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
              ReceiptArrived, Tick, StopRequested]

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


# ------------------------------------------------------------------------------------- machine


def initial(policy: Policy, *, now: float, round: RoundInfo | None, done_round: int,
            outbox: list[tuple[int, str]], steps: int = 0, planned: int | None = None, gates_open: bool = True,
            gate_reasons: tuple[str, ...] = ()) -> tuple[State, list[Action]]:
    """The state after a (re)start, from what was on disk and the first sensor readings;
    re-publishes what waits in the outbox."""
    _check_now(now)
    out: list[Action] = []
    keep: list[Pending] = []
    for rnd, uid in sorted(outbox):
        if rnd <= done_round or (round is not None and rnd < round.round):
            out.append(DropUpdate(rnd, uid))
        else:
            keep.append(Pending(rnd, uid, now))
            out.append(Publish(rnd, uid))
    state = State(policy=policy, round=round, done_round=done_round, outbox=tuple(keep),
                  steps=steps, planned=planned, gates_open=gates_open, gate_reasons=tuple(gate_reasons))
    state = _schedule(state, now, out)
    out.append(Telemetry())
    return state, out


def handle(state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    _check_now(now)
    apply = _HANDLERS.get(type(event))
    if apply is None:
        raise IllegalTransition(f"not a lifecycle event: {event!r}")
    out: list[Action] = []
    new = apply(state, event, now, out)
    new = _schedule(new, now, out)
    if new.phase != state.phase and not any(isinstance(a, Telemetry) for a in out):
        out.append(Telemetry())
    return new, out


def next_wakeup(state: State, now: float) -> float | None:
    """The next time after ``now`` at which the machine wants a ``Tick``, if any (rest end,
    deadline, re-send). A time already past has had its tick; waiting for it again would spin."""
    times = [p.sent_at + state.policy.resend_s for p in state.outbox]
    if state.rest_until is not None:
        times.append(state.rest_until)
    if state.needs_work and state.round is not None:
        times.append(state.round.deadline - state.policy.deadline_margin_s)
    future = [t for t in times if t > now]
    return min(future) if future else None


def _check_now(now: float) -> None:
    if not isinstance(now, (int, float)) or not math.isfinite(now):
        raise IllegalTransition(f"now must be a finite number, got {now!r}")


def _r(state: State, **changes: object) -> State:
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def _rest(state: State, now: float, cpu_s: float, wall_s: float) -> State:
    p = state.policy
    rest = rest_seconds(cpu_s=max(cpu_s, 0.0), wall_s=max(wall_s, 0.0), duty_cycle=p.duty_cycle, threads=p.threads)
    if rest <= 0:
        return _r(state, rest_until=None, rest_s=0.0)
    return _r(state, rest_until=now + rest, rest_s=rest)


def _on_announced(s: State, e: Announced, now: float, out: list[Action]) -> State:
    if s.round is not None and e.round < s.round.round:
        return s  # older than what we follow: the shell refuses these too
    if s.round is not None and e.round == s.round.round and e.model_sha256 == s.round.model_sha256:
        return _r(s, round=RoundInfo(e.round, e.deadline, e.model_sha256))  # deadline extended
    keep = []
    for p in s.outbox:
        if p.round < e.round:
            out.append(DropUpdate(p.round, p.update_id))  # its round has closed
        else:
            keep.append(p)
    s = _r(s, round=RoundInfo(e.round, e.deadline, e.model_sha256), outbox=tuple(keep), steps=0,
           planned=None, failures=0, error=None, rest_until=None, rest_s=0.0, submitting=False)
    if e.deadline <= now + DEADLINE_RESOLUTION_S and e.round > s.done_round:
        # Over before it reached us (the coordinator's final model comes this way): nothing to train.
        out.append(SaveDone(e.round, PAST_DEADLINE))
        s = _r(s, done_round=e.round, last_receipt=PAST_DEADLINE)
    return s


def _on_gates(s: State, e: GatesChanged, now: float, out: list[Action]) -> State:
    return _r(s, gates_open=e.open, gate_reasons=tuple(e.reasons))


def _progress(s: State, rnd: int, steps: int, planned: int) -> State:
    if s.round is None or rnd != s.round.round or s.worker_round != rnd:
        return s
    return _r(s, steps=steps, planned=planned)


def _on_ready(s: State, e: WorkerReady, now: float, out: list[Action]) -> State:
    if s.worker == Worker.STARTING:
        s = _r(s, worker=Worker.IDLE)
    out.append(PingWatchdog())
    return _rest(_progress(s, e.round, e.steps, e.planned), now, e.cpu_s, e.wall_s)


def _on_chunk(s: State, e: ChunkDone, now: float, out: list[Action]) -> State:
    if s.worker == Worker.BUSY:
        s = _r(s, worker=Worker.IDLE, failures=0, error=None)  # a chunk went through: the trainer works
    out.append(PingWatchdog())
    return _rest(_progress(s, e.round, e.steps, e.planned), now, e.cpu_s, e.wall_s)


def _on_exited(s: State, e: WorkerExited, now: float, out: list[Action]) -> State:
    asked = s.worker == Worker.STOPPING
    s = _r(s, worker=Worker.NONE, worker_round=None)
    if (asked and e.error is None) or s.stopping:
        return s
    failures = s.failures + 1
    wait = backoff_seconds(failures=failures, base_s=s.policy.backoff_s)
    return _r(s, failures=failures, error=e.error or "the trainer exited unexpectedly",
              rest_until=now + wait, rest_s=wait)


def _on_stored(s: State, e: UpdateStored, now: float, out: list[Action]) -> State:
    out.append(Telemetry())
    if s.round is not None and e.round < s.round.round:
        out.append(DropUpdate(e.round, e.update_id))  # a newer round opened meanwhile
        return _r(s, submitting=False)
    return _r(s, submitting=False, outbox=s.outbox + (Pending(e.round, e.update_id, now),))


def _on_submit_failed(s: State, e: SubmitFailed, now: float, out: list[Action]) -> State:
    failures = s.failures + 1
    wait = backoff_seconds(failures=failures, base_s=s.policy.backoff_s)
    # Progress is re-learned from a fresh trainer, which checkpoints again.
    return _r(s, submitting=False, failures=failures, error=e.error, steps=0, planned=None,
              rest_until=now + wait, rest_s=wait)


def _on_receipt(s: State, e: ReceiptArrived, now: float, out: list[Action]) -> State:
    match = [p for p in s.outbox if p.round == e.round and p.update_id == e.update_id]
    if not match:
        return s  # a repeated receipt, or one for an update we no longer hold
    result = "accepted" if e.accepted else (e.reason or "rejected")
    if e.round > s.done_round:
        out.append(SaveDone(e.round, result))
    out.append(DropUpdate(e.round, e.update_id))
    out.append(Telemetry())
    return _r(s, done_round=max(s.done_round, e.round), last_receipt=result,
              outbox=tuple(p for p in s.outbox if p not in match))


def _on_tick(s: State, e: Tick, now: float, out: list[Action]) -> State:
    return s


def _on_stop(s: State, e: StopRequested, now: float, out: list[Action]) -> State:
    return _r(s, stopping=True)


_HANDLERS = {
    Announced: _on_announced, GatesChanged: _on_gates, WorkerReady: _on_ready, ChunkDone: _on_chunk,
    WorkerExited: _on_exited, UpdateStored: _on_stored, SubmitFailed: _on_submit_failed,
    ReceiptArrived: _on_receipt, Tick: _on_tick, StopRequested: _on_stop,
}


def _stop_worker(s: State, out: list[Action]) -> State:
    if s.worker in (Worker.STARTING, Worker.IDLE, Worker.BUSY):
        out.append(StopWorker(interrupt=s.worker != Worker.IDLE))
        return _r(s, worker=Worker.STOPPING)
    return s


def _schedule(s: State, now: float, out: list[Action]) -> State:
    """What to do next, given the state and the time; runs after every event."""
    p = s.policy
    if s.stopping:
        s = _stop_worker(s, out)
        if s.worker == Worker.NONE and not s.exited:
            out.append(Exit())
            s = _r(s, exited=True)
        return s
    due_again = [x for x in s.outbox if now - x.sent_at >= p.resend_s]
    if due_again:
        out.extend(Publish(x.round, x.update_id) for x in due_again)
        s = _r(s, outbox=tuple(dataclasses.replace(x, sent_at=now) if x in due_again else x for x in s.outbox))
    if s.rest_until is not None and s.rest_until - now > s.rest_s:
        s = _r(s, rest_until=now + s.rest_s)  # the wall clock went back: rest no longer than asked
    if s.rest_until is not None and now >= s.rest_until:
        s = _r(s, rest_until=None, rest_s=0.0)
    r = s.round
    if r is None or not s.needs_work:
        return _stop_worker(s, out)
    if s.worker_round is not None and s.worker_round != r.round:
        return _stop_worker(s, out)  # a trainer of an older round
    if s.worker in (Worker.STARTING, Worker.BUSY, Worker.STOPPING) or s.submitting:
        return s
    due_at = r.deadline - p.deadline_margin_s
    if s.planned is not None and (s.steps >= s.planned or (now >= due_at and s.steps >= p.min_steps)):
        out.append(Submit(r.round, partial=s.steps < s.planned))
        return _stop_worker(_r(s, submitting=True), out)
    if not s.gates_open:
        return _stop_worker(s, out)  # a pause may be long: give the trainer's memory back
    if s.rest_until is not None:
        return s
    if s.worker == Worker.NONE:
        out.append(StartWorker(r.round))
        return _r(s, worker=Worker.STARTING, worker_round=r.round)
    remaining = due_at - now
    out.append(RunChunk(min(p.chunk_s, remaining) if remaining > 0 else p.chunk_s))
    return _r(s, worker=Worker.BUSY)
