"""Buffered asynchronous rounds (FedBuff, Nguyen et al., AISTATS 2022) as a pure policy.

``handle(state, event, now) -> (state, actions)``, the same signature, state, events and actions
as the synchronous policy of :mod:`.rounds`, which stays the default: a state whose configuration
says ``mode: sync`` is handed to it unchanged. The coordinator calls this module's ``handle`` for
both modes.

In the asynchronous mode a round is one version of the global model:

* it closes (``buffer_full``) as soon as ``buffer_size`` updates are counted, or every enrolled
  site has one counted, without waiting for a quorum, a grace period or the deadline; the deadline
  is still extended and re-announced while the buffer fills, as in the synchronous mode;
* an update for the current round is judged by the synchronous rules;
* an update trained from an earlier version (``round < state.round``) is taken while its staleness
  ``s = state.round - round`` is at most ``max_staleness`` and its base model is the one that
  version trained from; it is counted in the current buffer, marked with its staleness, and the
  close weighs its delta down by :func:`.staleness.staleness_weight`. Beyond ``max_staleness`` it
  is refused as ``too_stale``;
* a re-delivery of an update counted in this buffer or in one of the earlier versions still kept
  is acknowledged again with its accepted receipt and counted nothing (a site whose receipt was
  lost on a bad link re-publishes the same update id).

Invariants, on top of those of :mod:`.rounds` (which every state still keeps):

1. At most one counted update per site and buffer, and an update id is counted in at most one
   buffer among those within ``max_staleness``.
2. ``state.earlier`` holds exactly the rounds before the current one that an update may still
   have trained from, newest first: ``len(earlier) <= max_staleness``.
3. An open asynchronous round never holds ``buffer_size`` (capped at the enrolled count) updates:
   the event that fills it closes it.
4. The actions keep the synchronous order: payloads stored, then one ``SaveState`` of the final
   state, then acks, receipts, log lines, the close.

Time runs first here as there: an update for an earlier version is judged after the clock has
extended the deadline if it was due.
"""

from __future__ import annotations

from fednca.rounds_vocab import CloseReason, Reason, RoundReason, RoundStatus, Verdict

from . import roundlog, rounds
from .async_state import ASYNC, EarlierRound, update_key
from .round_events import (
    Ack, Action, CloseRound, Event, LogEvent, OpenRound, SaveState, SendReceipt, StoreUpdate, Tick, UpdateVerified,
)
from .round_state import AcceptedUpdate, RoundState

__all__ = ["handle", "open_round"]

OPEN, CLOSED = RoundStatus.OPEN, RoundStatus.CLOSED
open_round = rounds.open_round  # the first round opens alike in both modes


def handle(state: RoundState, event: Event, now: float) -> tuple[RoundState, list[Action]]:
    """Apply ``event`` at ``now`` by the policy ``state.config.mode`` names."""
    if state.config.mode != ASYNC:
        return rounds.handle(state, event, now)
    if isinstance(event, UpdateVerified) and event.round < state.round:
        new, actions = rounds.handle(state, Tick(), now)  # time runs first
        new, actions = _on_earlier(new, event, now, actions)
    elif isinstance(event, OpenRound):
        new, actions = rounds.handle(state, event, now)
        new = new.derive(earlier=_earlier_after(state, new))
    else:
        new, actions = rounds.handle(state, event, now)
    new, actions = _close_if_full(new, now, actions)
    return new, _ordered(state, new, actions)


def _earlier_after(closed: RoundState, opened: RoundState) -> tuple[EarlierRound, ...]:
    """The earlier rounds the newly opened round keeps: the one just closed first."""
    keep = opened.config.max_staleness
    if keep == 0:
        return ()
    last = EarlierRound(closed.model_sha256, tuple(update_key(a.site, a.update_id) for a in closed.accepted))
    return (last, *closed.earlier)[:keep]


def _on_earlier(state: RoundState, e: UpdateVerified, now: float, actions: list[Action]) -> tuple[RoundState, list[Action]]:
    """An update trained from an earlier version than the current round's."""
    out = list(actions)
    s = state.round - e.round
    prior = state.accepted_from(e.site)
    if (prior is not None and prior.update_id == e.update_id) or any(
            r.counted(e.site, e.update_id) for r in state.earlier):  # fmt: skip
        out += [Ack(e.site, e.update_id), SendReceipt(e.site, e.update_id, e.round, True, Verdict.ACCEPTED)]
        out.append(LogEvent(roundlog.UpdateRedeliveredRecord(round=state.round, at=now, site=e.site,
                                                             update_id=e.update_id)))  # fmt: skip
        return state, out
    reason = _refusal(state, e, s)
    if reason is not None:
        out += [Ack(e.site, e.update_id), SendReceipt(e.site, e.update_id, e.round, False, reason)]
        out.append(LogEvent(roundlog.UpdateRejectedRecord(round=state.round, at=now, site=e.site,
                                                          update_id=e.update_id, update_round=e.round,
                                                          reason=reason)))  # fmt: skip
        return state, out
    entry = AcceptedUpdate(e.site, e.update_id, e.samples, e.steps, e.partial, now, s)
    out.insert(0, StoreUpdate(state.round, e.site, e.update_id))
    out += [Ack(e.site, e.update_id), SendReceipt(e.site, e.update_id, e.round, True, Verdict.ACCEPTED)]
    out.append(LogEvent(roundlog.UpdateAcceptedRecord(round=state.round, at=now, site=e.site, update_id=e.update_id,
                                                      samples=e.samples, steps=e.steps, partial=e.partial,
                                                      metrics=e.metrics, staleness=s)))  # fmt: skip
    accepted = state.accepted.appended(entry)  # type: ignore[attr-defined]
    reached = len(accepted) >= state.quorum
    quorum_at = (state.quorum_at if state.quorum_at is not None else now) if reached else None
    return state.derive(accepted=accepted, quorum_at=quorum_at), out


def _refusal(state: RoundState, e: UpdateVerified, s: int) -> Reason | RoundReason | None:
    """Why an update ``s`` versions behind is refused, the first rule that applies; None: take it."""
    if e.site not in state.enrolled:
        return Reason.UNKNOWN_SITE
    if s > state.config.max_staleness or s > len(state.earlier):
        return RoundReason.TOO_STALE  # (a round before the mode was switched on has no record either)
    if state.status != OPEN:
        return RoundReason.ROUND_CLOSED
    if e.base_sha256 != state.earlier[s - 1].model_sha256:
        return Reason.WRONG_BASE_MODEL
    if state.accepted_from(e.site) is not None:
        return RoundReason.DUPLICATE_SITE
    if e.samples <= 0:
        return RoundReason.NO_SAMPLES
    return None


def _close_if_full(state: RoundState, now: float, actions: list[Action]) -> tuple[RoundState, list[Action]]:
    """Close an open round whose buffer is full (invariant 3)."""
    if state.status != OPEN or len(state.accepted) < state.quorum:
        return state, actions
    out = list(actions)
    out.append(LogEvent(roundlog.RoundClosedRecord(
        round=state.round, at=now, reason=CloseReason.BUFFER_FULL, sites=tuple(a.site for a in state.accepted),
        samples=sum(a.samples for a in state.accepted), extensions=state.extensions,
    )))  # fmt: skip
    out.append(CloseRound(state.round, CloseReason.BUFFER_FULL, state.accepted))
    return state.derive(status=CLOSED, close_reason=CloseReason.BUFFER_FULL, closed_at=now), out


def _ordered(before: RoundState, after: RoundState, actions: list[Action]) -> list[Action]:
    """Payloads first, then one save of the final state (when it changed), then the rest in the
    order they came: the synchronous policy's order, whatever the steps above added."""
    stored = [a for a in actions if isinstance(a, StoreUpdate)]
    rest = [a for a in actions if not isinstance(a, (StoreUpdate, SaveState))]
    return [*stored, *([SaveState(after)] if after is not before else []), *rest]
