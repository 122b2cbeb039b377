"""The round policy of a federation, as a pure state machine.

``handle(state, event, now) -> (state, actions)``. The coordinator's shell turns MQTT messages,
operator commands and clock ticks into events, and performs the returned actions in order. Nothing
here reads a clock, a file or the network; ``now`` is seconds since the epoch, passed in.

The state and its checks are in :mod:`.round_state`, the events and actions in :mod:`.round_events`,
the lines it logs in :mod:`.roundlog`; this module is the transition table and the rules.

Invariants (checked whenever a ``RoundState`` is built or derived, so after every ``handle`` call):

1. At most one accepted update per site and round; ``accepted`` keeps acceptance order, which is
   the order the round is aggregated in.
2. While the round is open, every accepted site is currently enrolled: revoking a site drops its
   accepted update from the open round (its key is no longer trusted, so neither is what it signed).
3. While open, ``quorum_at`` is set exactly when at least ``quorum`` updates are accepted, and holds
   the time this last became true. ``quorum`` comes from the configuration and the current
   enrolment and is never below 1.
4. A round closes with at least one accepted update. Once closed, its accepted set, model and
   close reason never change; only the enrolment does, for the next round.
5. Every update message, accepted or not, gets exactly one ``Ack`` and one ``SendReceipt`` per
   delivery. When the state changes, ``SaveState`` comes after any ``StoreUpdate`` and before any
   ``Ack``: the broker hears of an update only once it and the state that counts it are durable.
6. Peer behaviour never raises: a stale, duplicate or unknown update becomes a rejected receipt. An
   illegal event (a mistake of the shell or the operator, such as opening a round while one is
   open) raises ``IllegalRoundEvent`` and no new state is produced.

Cost: an event costs O(1) whatever the number of sites (a revocation, or a change of enrolment,
costs O(n), and the close builds its log line in O(n), once a round). The accepted updates are an
indexed, append-only :class:`.round_state.Accepted` shared by the states derived from one another;
no rule walks them, and ``handle`` tells a changed state from an unchanged one by identity.

Time runs first: before an event is applied, the round is closed or extended as the clock says it
should have been by ``now``. An update that arrives after the grace period or the deadline is
therefore judged against the closed round, however rarely ``Tick`` is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from fednca.rounds_vocab import CloseReason, Reason, RejectReason, RoundReason, RoundStatus, Verdict

from . import roundlog
from .errors import IllegalRoundEvent, RoundError, RoundStateError
from .round_events import (
    Ack, Action, Announce, CloseRound, Event, LogEvent, OpenRound, SaveState, SendReceipt, SiteEnrolled, SiteRevoked,
    StoreUpdate, Tick, UpdateRejected, UpdateVerified,
)
from .round_state import AcceptedUpdate, RoundConfig, RoundState

__all__ = [
    "Ack", "AcceptedUpdate", "Action", "Announce", "CloseRound", "Event", "IllegalRoundEvent", "LogEvent", "OpenRound",
    "RoundConfig", "RoundError", "RoundState", "RoundStateError", "SaveState", "SendReceipt", "SiteEnrolled",
    "SiteRevoked", "StoreUpdate", "Tick", "UpdateRejected", "UpdateVerified", "handle", "open_round",
]

OPEN, CLOSED = RoundStatus.OPEN, RoundStatus.CLOSED

# The policy ---------------------------------------------------------------------------------------


@dataclass
class _Actions:
    """Actions gathered while handling one event; ``result`` puts them in the order the shell needs."""

    stored: list[StoreUpdate] = field(default_factory=list)
    rest: list[Action] = field(default_factory=list)

    def log(self, record: roundlog.LogRecord) -> None:
        self.rest.append(LogEvent(record))

    def result(self, before: RoundState, after: RoundState) -> list[Action]:
        # A handler returns the state it was given when nothing changed; comparing by identity
        # keeps this O(1) however many updates the round counts.
        saved: list[Action] = [SaveState(after)] if after is not before else []
        return [*self.stored, *saved, *self.rest]


def open_round(
    *,
    federation: str,
    round: int,
    model_sha256: str,
    enrolled: frozenset[str] | set[str],
    config: RoundConfig,
    now: float,
    deadline: float | None = None,
) -> tuple[RoundState, list[Action]]:
    """The first round of a federation; later rounds open with the ``OpenRound`` event."""
    _check_now(now)
    out = _Actions()
    state = _opened(federation, round, model_sha256, frozenset(enrolled), config, now, deadline, out)
    return state, [SaveState(state), *out.rest]


def handle(state: RoundState, event: Event, now: float) -> tuple[RoundState, list[Action]]:
    """Apply ``event`` at time ``now``; return the new state and the actions to perform, in order."""
    _check_now(now)
    handler = _TRANSITIONS[state.status].get(type(event))
    if handler is None:
        raise IllegalRoundEvent(f"{type(event).__name__} is not allowed while round {state.round} is {state.status}")
    out = _Actions()
    new = _due(state, now, out)
    new = handler(new, event, now, out)
    new = _due(new, now, out)
    return new, out.result(state, new)


def _check_now(now: float) -> None:
    if not isinstance(now, (int, float)) or isinstance(now, bool) or not math.isfinite(now):
        raise IllegalRoundEvent(f"now must be a finite number of seconds, got {now!r}")


def _evolve(state: RoundState, now: float, **changes: Any) -> RoundState:
    """``state`` with ``changes``, and ``quorum_at`` brought in line with them (invariant 3); O(1)
    unless the enrolment changes or an update is dropped (:meth:`RoundState.derive`)."""
    status = changes.get("status", state.status)
    if status == OPEN:
        accepted, enrolled = changes.get("accepted", state.accepted), changes.get("enrolled", state.enrolled)
        reached = len(accepted) >= changes.get("config", state.config).quorum(len(enrolled))
        changes["quorum_at"] = (state.quorum_at if state.quorum_at is not None else now) if reached else None
    return state.derive(**changes)


def _opened(
    federation: str, round: int, model_sha256: str, enrolled: frozenset[str],
    config: RoundConfig, now: float, deadline: float | None, out: _Actions,
) -> RoundState:  # fmt: skip
    deadline = now + config.round_s if deadline is None else deadline
    if not isinstance(deadline, (int, float)) or not now < deadline < math.inf:
        raise IllegalRoundEvent(f"round {round}: deadline {deadline!r} is not after now ({now})")
    state = RoundState(
        federation=federation, round=round, model_sha256=model_sha256, config=config,
        opened_at=now, deadline=deadline, enrolled=enrolled,
    )  # fmt: skip
    out.log(roundlog.RoundOpenedRecord(round=round, at=now, model_sha256=model_sha256, deadline=deadline,
                                       quorum=state.quorum, enrolled=tuple(sorted(enrolled))))
    out.rest.append(Announce(round, model_sha256, deadline, state.quorum))
    return state


def _due(state: RoundState, now: float, out: _Actions) -> RoundState:
    """Close or extend an open round if the rules say it is due by ``now``."""
    if state.status != OPEN:
        return state
    if state.all_reported:
        return _close(state, now, CloseReason.ALL_REPORTED, out)
    if state.quorum_at is not None:
        if state.config.mode == "async":
            return state  # a full buffer is closed by the buffered policy (.async_rounds), grace or not
        grace_end = state.quorum_at + state.config.grace_s
        if now >= min(grace_end, state.deadline):
            return _close(state, now, CloseReason.GRACE if grace_end < state.deadline else CloseReason.DEADLINE, out)
    elif now >= state.deadline:
        deadline = now + state.config.extension_s
        n, k = len(state.accepted), state.quorum
        out.log(roundlog.DeadlineExtendedRecord(
            round=state.round, at=now, previous_deadline=state.deadline, deadline=deadline, accepted=n, quorum=k,
            why=f"{n} of the {k} updates needed had arrived by the deadline",
        ))  # fmt: skip
        out.rest.append(Announce(state.round, state.model_sha256, deadline, k))
        return _evolve(state, now, deadline=deadline, extensions=state.extensions + 1)
    return state


def _close(state: RoundState, now: float, reason: CloseReason, out: _Actions) -> RoundState:
    out.log(roundlog.RoundClosedRecord(
        round=state.round, at=now, reason=reason, sites=tuple(a.site for a in state.accepted),
        samples=sum(a.samples for a in state.accepted), extensions=state.extensions,
    ))  # fmt: skip
    out.rest.append(CloseRound(state.round, reason, state.accepted))
    return _evolve(state, now, status=CLOSED, close_reason=reason, closed_at=now)


# An update that is not a re-delivery must pass these checks, in order; the first it fails names
# the reason on its rejected receipt.
_UPDATE_RULES: tuple[tuple[RejectReason, Callable[[RoundState, UpdateVerified], bool]], ...] = (
    (Reason.UNKNOWN_SITE, lambda s, e: e.site in s.enrolled),
    (Reason.STALE_ROUND, lambda s, e: e.round >= s.round),
    (RoundReason.UNKNOWN_ROUND, lambda s, e: e.round <= s.round),
    (RoundReason.ROUND_CLOSED, lambda s, e: s.status == OPEN),
    (Reason.WRONG_BASE_MODEL, lambda s, e: e.base_sha256 == s.model_sha256),
    (RoundReason.DUPLICATE_SITE, lambda s, e: s.accepted_from(e.site) is None),
    (RoundReason.NO_SAMPLES, lambda s, e: e.samples > 0),
)


def _on_update(state: RoundState, e: UpdateVerified, now: float, out: _Actions) -> RoundState:
    prior = state.accepted_from(e.site)
    if e.round == state.round and prior is not None and prior.update_id == e.update_id:
        out.rest += [Ack(e.site, e.update_id), SendReceipt(e.site, e.update_id, e.round, True, Verdict.ACCEPTED)]
        out.log(roundlog.UpdateRedeliveredRecord(round=state.round, at=now, site=e.site, update_id=e.update_id))
        return state
    reason = next((reason for reason, holds in _UPDATE_RULES if not holds(state, e)), None)
    if reason is not None:
        return _reject(state, e.site, e.update_id, e.round, reason, now, out)
    entry = AcceptedUpdate(e.site, e.update_id, e.samples, e.steps, e.partial, now)
    out.stored.append(StoreUpdate(state.round, e.site, e.update_id))
    out.rest += [Ack(e.site, e.update_id), SendReceipt(e.site, e.update_id, e.round, True, Verdict.ACCEPTED)]
    out.log(roundlog.UpdateAcceptedRecord(round=state.round, at=now, site=e.site, update_id=e.update_id,
                                          samples=e.samples, steps=e.steps, partial=e.partial,
                                          metrics=e.metrics))  # fmt: skip
    return _evolve(state, now, accepted=state.accepted.appended(entry))


def _on_rejected(state: RoundState, e: UpdateRejected, now: float, out: _Actions) -> RoundState:
    return _reject(state, e.site, e.update_id, state.round if e.round is None else e.round, e.reason, now, out)


def _reject(
    state: RoundState, site: str, update_id: str | None, round: int, reason: RejectReason, now: float, out: _Actions
) -> RoundState:
    out.rest += [Ack(site, update_id), SendReceipt(site, update_id, round, False, reason)]
    out.log(roundlog.UpdateRejectedRecord(round=state.round, at=now, site=site, update_id=update_id,
                                          update_round=round, reason=reason))  # fmt: skip
    return state


def _on_tick(state: RoundState, e: Tick, now: float, out: _Actions) -> RoundState:
    return state


def _on_enrolled(state: RoundState, e: SiteEnrolled, now: float, out: _Actions) -> RoundState:
    if e.site in state.enrolled:
        return state
    out.log(roundlog.SiteEnrolledRecord(round=state.round, at=now, site=e.site))
    return _evolve(state, now, enrolled=state.enrolled | {e.site})


def _on_revoked(state: RoundState, e: SiteRevoked, now: float, out: _Actions) -> RoundState:
    if e.site not in state.enrolled:
        return state
    out.log(roundlog.SiteRevokedRecord(round=state.round, at=now, site=e.site))
    dropped = state.accepted_from(e.site) if state.status == OPEN else None
    if dropped is not None:
        out.log(roundlog.UpdateDroppedRecord(round=state.round, at=now, site=e.site, update_id=dropped.update_id,
                                             reason=RoundReason.SITE_REVOKED))  # fmt: skip
    kept = state.accepted.without(e.site) if dropped is not None else state.accepted
    return _evolve(state, now, enrolled=state.enrolled - {e.site}, accepted=kept)


def _on_open(state: RoundState, e: OpenRound, now: float, out: _Actions) -> RoundState:
    if e.round <= state.round:
        raise IllegalRoundEvent(f"round {e.round} cannot follow round {state.round}")
    config = state.config if e.config is None else e.config
    return _opened(state.federation, e.round, e.model_sha256, state.enrolled, config, now, e.deadline, out)


_Handler = Callable[[RoundState, Any, float, _Actions], RoundState]
_ANY_STATUS: dict[type, _Handler] = {
    UpdateVerified: _on_update,
    UpdateRejected: _on_rejected,
    Tick: _on_tick,
    SiteEnrolled: _on_enrolled,
    SiteRevoked: _on_revoked,
}
# The events each status accepts, and the function that applies each; anything else is illegal.
_TRANSITIONS: dict[RoundStatus, dict[type, _Handler]] = {
    OPEN: _ANY_STATUS,
    CLOSED: {**_ANY_STATUS, OpenRound: _on_open},
}
