"""The daemon's lifecycle as a pure state machine: ``handle(state, event, now) -> (state, actions)``.

The shell (:mod:`fednca_daemon.service`) turns MQTT messages, trainer messages, sensor readings,
signals and the clock into events and performs the returned actions in order. ``now`` is
wall-clock seconds (the round deadline is wall-clock); nothing here reads a clock or a file. The
state, events and actions are defined in :mod:`.lifecycle_vocab` and re-exported here.

How an event is handled is looked up in :data:`TRANSITIONS`, keyed by (trainer state, event
type). Events about the round, the gates, the outbox, time and stopping are legal whatever the
trainer does; the trainer's own events only where a trainer can send them (``WorkerReady`` while
it starts, ``ChunkDone`` while a chunk runs, ``WorkerExited`` while there is one, and each also
while it is being stopped). Any other pair is a bug of the shell: it raises
:class:`~fednca_daemon.errors.IllegalTransition` and no new state is produced. After the
transition, one scheduling step decides what to do next from the new state and the time
(start a trainer, run a chunk, rest, submit, stop): that part depends on the whole state, not on
the event, so it is one function rather than table entries.

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
   crash between the two never trains the round again), or when a newer round opens, or when its
   file was found damaged (then the round needs work again and is submitted anew). In buffered
   asynchronous rounds (the announcement's ``max_staleness``) an update stays while its round is
   at most that many rounds old: the coordinator still counts it, and the daemon meanwhile
   trains the newest round, whose update is a second one in the outbox. One refused there as
   ``duplicate_site`` (the buffer already counts another update of this site) is held, not
   dropped, and published again when the next model is announced: the next buffer counts it.
6. Stopping interrupts a running chunk, waits for the trainer to exit, then emits ``Exit``.
7. An update without a receipt is published again (same update id: the coordinator acknowledges
   a re-delivery without counting it twice) after :func:`resend_after`: a tenth of the time the
   round had left when it was sent, at least ``RESEND_MIN_S``, at most ``resend_s``, doubling
   with each resend up to ``resend_s``. A broker that took the update and then lost it (a full
   queue) is noticed within minutes, not ``resend_s``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from fednca.rounds_vocab import RoundReason

from .budget import backoff_seconds, rest_seconds
from .errors import IllegalTransition
from .lifecycle_vocab import (DEADLINE_RESOLUTION_S, PAST_DEADLINE, RESEND_FRACTION, RESEND_MIN_S, Action, Announced,
                              ChunkDone, DropUpdate, Event, Exit, GatesChanged, Pending, Phase, PingWatchdog, Policy,
                              Publish, ReceiptArrived, RoundInfo, RunChunk, SaveDone, StartWorker, State,
                              StopRequested, StopWorker, Submit, SubmitFailed, Telemetry, Tick, UpdateLost,
                              UpdateStored, Worker, WorkerExited, WorkerReady)

__all__ = [
    "DEADLINE_RESOLUTION_S", "PAST_DEADLINE", "RESEND_FRACTION", "RESEND_MIN_S", "TRANSITIONS", "Action",
    "Announced", "ChunkDone", "DropUpdate",
    "Event", "Exit", "GatesChanged", "IllegalTransition", "Pending", "Phase", "PingWatchdog", "Policy", "Publish",
    "ReceiptArrived", "RoundInfo", "RunChunk", "SaveDone", "StartWorker", "State", "StopRequested", "StopWorker",
    "Submit", "SubmitFailed", "Telemetry", "Tick", "UpdateLost", "UpdateStored", "Worker", "WorkerExited",
    "WorkerReady", "handle", "initial", "next_wakeup", "resend_after",
]

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
        if rnd <= done_round or (round is not None and not round.keeps(rnd)):
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
    """The state after ``event`` at ``now``, and the actions the shell performs, in order.
    An event the table has no transition for raises :class:`IllegalTransition`."""
    _check_now(now)
    apply = TRANSITIONS.get((state.worker, type(event)))
    if apply is None:
        if type(event) not in _EVENT_TYPES:
            raise IllegalTransition(f"not a lifecycle event: {event!r}")
        raise IllegalTransition(f"{type(event).__name__} cannot happen while the trainer is {state.worker.value}")
    out: list[Action] = []
    new = apply(state, event, now, out)
    new = _schedule(new, now, out)
    if new.phase != state.phase and not any(isinstance(a, Telemetry) for a in out):
        out.append(Telemetry())
    return new, out


def next_wakeup(state: State, now: float) -> float | None:
    """The next time after ``now`` at which the machine wants a ``Tick``, if any (rest end,
    deadline, re-send). A time already past has had its tick; waiting for it again would spin."""
    times = [p.sent_at + resend_after(state, p) for p in state.outbox if not p.held]
    if state.rest_until is not None:
        times.append(state.rest_until)
    if state.needs_work and state.round is not None:
        times.append(state.round.deadline - state.policy.deadline_margin_s)
    future = [t for t in times if t > now]
    return min(future) if future else None


def resend_after(state: State, pending: Pending) -> float:
    """How long after its last publication ``pending`` is published again without a receipt:
    ``RESEND_FRACTION`` of the time its round had left then (none once the round is not the
    current one or its deadline passed), within [``RESEND_MIN_S``, ``resend_s``], doubling with
    each resend, never past ``resend_s``."""
    p = state.policy
    r = state.round
    left = r.deadline - pending.sent_at if r is not None and r.round == pending.round else 0.0
    first = min(p.resend_s, max(RESEND_MIN_S, RESEND_FRACTION * left))
    return min(p.resend_s, first * 2.0 ** min(pending.resends, 30))


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
    info = RoundInfo(e.round, e.deadline, e.model_sha256, e.max_staleness)
    if s.round is not None and e.round == s.round.round and e.model_sha256 == s.round.model_sha256:
        return _r(s, round=info)  # deadline extended
    interrupted = _interrupted_work(s, info)
    keep = []
    for p in s.outbox:
        if not info.keeps(p.round):
            out.append(DropUpdate(p.round, p.update_id))  # its round has closed (and is too old to count)
        elif p.held:  # refused from the last buffer as duplicate_site: the next one counts it
            out.append(Publish(p.round, p.update_id))
            keep.append(dataclasses.replace(p, held=False, sent_at=now, resends=0))
        else:
            keep.append(p)  # a newer round, or in buffered rounds one still counted: keep sending it
    s = _r(s, round=info, outbox=tuple(keep), steps=0,
           planned=None, failures=0, error=None, rest_until=None, rest_s=0.0, submitting=interrupted is not None)
    if interrupted is not None:
        out.append(interrupted)
    if e.deadline <= now + DEADLINE_RESOLUTION_S and e.round > s.done_round:
        # Over before it reached us (the coordinator's final model comes this way): nothing to train.
        out.append(SaveDone(e.round, PAST_DEADLINE))
        s = _r(s, done_round=e.round, last_receipt=PAST_DEADLINE)
    return s


def _interrupted_work(s: State, newer: RoundInfo) -> Submit | None:
    """Buffered rounds: the work on the current round that ``newer`` interrupts, submitted as a
    partial update (tagged with its round) while the coordinator still counts it, so a site slower
    than the buffer's cadence still contributes. Only when at least half the planned steps (and
    ``min_steps``) are done: less is restarted from the newer model, since a buffer filled with
    barely begun deltas makes a model that moved little and interrupts every site again at once."""
    r = s.round
    if (r is None or not newer.max_staleness or not newer.keeps(r.round) or not s.needs_work or s.submitting
            or s.worker_round != r.round or s.planned is None
            or s.steps < max(s.policy.min_steps, s.planned / 2)):
        return None
    return Submit(r.round, partial=s.steps < s.planned)


def _on_gates(s: State, e: GatesChanged, now: float, out: list[Action]) -> State:
    return _r(s, gates_open=e.open, gate_reasons=tuple(e.reasons))


def _progress(s: State, rnd: int, steps: int, planned: int) -> State:
    if s.round is None or rnd != s.round.round or s.worker_round != rnd:
        return s
    return _r(s, steps=steps, planned=planned)


def _after_trainer_work(s: State, rnd: int, steps: int, planned: int, cpu_s: float, wall_s: float, now: float,
                        out: list[Action]) -> State:
    out.append(PingWatchdog())
    return _rest(_progress(s, rnd, steps, planned), now, cpu_s, wall_s)


def _on_ready(s: State, e: WorkerReady, now: float, out: list[Action]) -> State:
    """STARTING -> IDLE."""
    return _after_trainer_work(_r(s, worker=Worker.IDLE), e.round, e.steps, e.planned, e.cpu_s, e.wall_s, now, out)


def _on_ready_while_stopping(s: State, e: WorkerReady, now: float, out: list[Action]) -> State:
    """STOPPING stays: asked to stop while it started; its progress still counts."""
    return _after_trainer_work(s, e.round, e.steps, e.planned, e.cpu_s, e.wall_s, now, out)


def _on_chunk(s: State, e: ChunkDone, now: float, out: list[Action]) -> State:
    """BUSY -> IDLE; a chunk went through, so the trainer works: the failure count ends."""
    s = _r(s, worker=Worker.IDLE, failures=0, error=None)
    return _after_trainer_work(s, e.round, e.steps, e.planned, e.cpu_s, e.wall_s, now, out)


def _on_chunk_while_stopping(s: State, e: ChunkDone, now: float, out: list[Action]) -> State:
    """STOPPING stays: the interrupted chunk reports what it did before the trainer exits."""
    return _after_trainer_work(s, e.round, e.steps, e.planned, e.cpu_s, e.wall_s, now, out)


def _on_failed(s: State, e: WorkerExited, now: float, out: list[Action]) -> State:
    """STARTING, IDLE or BUSY -> NONE, unasked: a failure, retried after a back-off."""
    s = _r(s, worker=Worker.NONE, worker_round=None)
    if s.stopping:
        return s
    return _fail(s, e.error or "the trainer exited unexpectedly", now)


def _on_exited_as_asked(s: State, e: WorkerExited, now: float, out: list[Action]) -> State:
    """STOPPING -> NONE; an error on the way out still counts as a failure."""
    s = _r(s, worker=Worker.NONE, worker_round=None)
    if e.error is None or s.stopping:
        return s
    return _fail(s, e.error, now)


def _fail(s: State, error: str, now: float) -> State:
    failures = s.failures + 1
    wait = backoff_seconds(failures=failures, base_s=s.policy.backoff_s)
    return _r(s, failures=failures, error=error, rest_until=now + wait, rest_s=wait)


def _on_stored(s: State, e: UpdateStored, now: float, out: list[Action]) -> State:
    out.append(Telemetry())
    if s.round is not None and not s.round.keeps(e.round):
        out.append(DropUpdate(e.round, e.update_id))  # a newer round opened meanwhile
        return _r(s, submitting=False)
    return _r(s, submitting=False, outbox=s.outbox + (Pending(e.round, e.update_id, now),))


def _on_submit_failed(s: State, e: SubmitFailed, now: float, out: list[Action]) -> State:
    failures = s.failures + 1
    wait = backoff_seconds(failures=failures, base_s=s.policy.backoff_s)
    # Progress is re-learned from a fresh trainer, which checkpoints again.
    return _r(s, submitting=False, failures=failures, error=e.error, steps=0, planned=None,
              rest_until=now + wait, rest_s=wait)


def _on_update_lost(s: State, e: UpdateLost, now: float, out: list[Action]) -> State:
    """The stored update cannot be sent (its file was damaged): the round needs work again."""
    keep = tuple(p for p in s.outbox if not (p.round == e.round and p.update_id == e.update_id))
    if len(keep) == len(s.outbox):
        return s
    out.append(Telemetry())
    return _r(s, outbox=keep, error=e.error, steps=0, planned=None)


def _on_receipt(s: State, e: ReceiptArrived, now: float, out: list[Action]) -> State:
    match = [p for p in s.outbox if p.round == e.round and p.update_id == e.update_id]
    if not match:
        return s  # a repeated receipt, or one for an update we no longer hold
    if not e.accepted and e.reason == RoundReason.DUPLICATE_SITE.value and s.round is not None and s.round.max_staleness > 0:
        out.append(Telemetry())  # buffered rounds: held for the next buffer, not dropped
        return _r(s, last_receipt=e.reason, outbox=tuple(dataclasses.replace(p, held=True) if p in match else p
                                                         for p in s.outbox))
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


Transition = Callable[[State, Event, float, list[Action]], State]

# Events that do not come from the trainer: legal whatever the trainer does.
_ANY_TRAINER_STATE: dict[type, Transition] = {
    Announced: _on_announced, GatesChanged: _on_gates, UpdateStored: _on_stored,  # type: ignore[dict-item]
    SubmitFailed: _on_submit_failed, ReceiptArrived: _on_receipt, Tick: _on_tick,  # type: ignore[dict-item]
    UpdateLost: _on_update_lost,  # type: ignore[dict-item]
    StopRequested: _on_stop,  # type: ignore[dict-item]
}

# (trainer state, event) -> transition. A pair that is missing raises IllegalTransition.
TRANSITIONS: dict[tuple[Worker, type], Transition] = {
    **{(w, ev): t for w in Worker for ev, t in _ANY_TRAINER_STATE.items()},
    (Worker.STARTING, WorkerReady): _on_ready,  # type: ignore[dict-item]
    (Worker.STOPPING, WorkerReady): _on_ready_while_stopping,  # type: ignore[dict-item]
    (Worker.BUSY, ChunkDone): _on_chunk,  # type: ignore[dict-item]
    (Worker.STOPPING, ChunkDone): _on_chunk_while_stopping,  # type: ignore[dict-item]
    (Worker.STARTING, WorkerExited): _on_failed,  # type: ignore[dict-item]
    (Worker.IDLE, WorkerExited): _on_failed,  # type: ignore[dict-item]
    (Worker.BUSY, WorkerExited): _on_failed,  # type: ignore[dict-item]
    (Worker.STOPPING, WorkerExited): _on_exited_as_asked,  # type: ignore[dict-item]
}
_EVENT_TYPES = frozenset(ev for _, ev in TRANSITIONS)


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
    due_again = [x for x in s.outbox if not x.held and now - x.sent_at >= resend_after(s, x)]
    if due_again:
        out.extend(Publish(x.round, x.update_id) for x in due_again)
        s = _r(s, outbox=tuple(dataclasses.replace(x, sent_at=now, resends=x.resends + 1) if x in due_again else x
                               for x in s.outbox))
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
