"""The round policy of a federation, as a pure state machine.

``handle(state, event, now) -> (state, actions)``. The coordinator's shell turns MQTT messages,
operator commands and clock ticks into events, and performs the returned actions in order. Nothing
here reads a clock, a file or the network; ``now`` is seconds since the epoch, passed in.

Invariants (checked whenever a ``RoundState`` is built, so after every ``handle`` call):

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
   open) raises ``IllegalEvent`` and no new state is produced.

Time runs first: before an event is applied, the round is closed or extended as the clock says it
should have been by ``now``. An update that arrives after the grace period or the deadline is
therefore judged against the closed round, however rarely ``Tick`` is sent.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from fednca.config import from_mapping
from fednca.errors import ConfigError, FedNCAError

OPEN, CLOSED = "open", "closed"
ACCEPTED = "accepted"  # the reason on an accepted receipt
# Reasons the policy gives on a rejected receipt (the wire codec has its own, passed through as is).
UNKNOWN_SITE, STALE_ROUND, UNKNOWN_ROUND, ROUND_CLOSED = "unknown_site", "stale_round", "unknown_round", "round_closed"
WRONG_BASE_MODEL, DUPLICATE_SITE, NO_SAMPLES = "wrong_base_model", "duplicate_site", "no_samples"
# Why a round closed.
ALL_REPORTED, GRACE, DEADLINE = "all_reported", "grace", "deadline"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class RoundError(FedNCAError):
    """Root of the round policy's errors."""


class IllegalEvent(RoundError):
    """The event makes no sense in this state; the state is left as it was."""


class StateError(RoundError, ValueError):
    """A round state (built in code or read back from disk) breaks an invariant; names the field."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"round state {field}: {why}")
        self.field = field


def _finite(name: str, value: Any, error: Callable[[str, str], Exception], *, minimum: float = -math.inf) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum <= value < math.inf:
        bound = "" if minimum == -math.inf else f" >= {minimum:g}"
        raise error(name, f"must be a finite number{bound}, got {value!r}")


def _integer(name: str, value: Any, error: Callable[[str, str], Exception], *, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise error(name, f"must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RoundConfig:
    quorum_fraction: float = 0.6  # K = ceil(fraction * enrolled sites) ...
    quorum_count: int | None = None  # ... unless a fixed K is given (capped at the enrolled count)
    grace_s: float = 300.0  # close this long after the K-th accepted update
    round_s: float = 3600.0  # a new round's deadline is this long after it opens
    extension_s: float = 1800.0  # at the deadline with fewer than K updates, extend by this much

    def __post_init__(self) -> None:
        f = self.quorum_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise ConfigError("quorum_fraction", f"must be a number in (0, 1], got {f!r}")
        if self.quorum_count is not None:
            _integer("quorum_count", self.quorum_count, ConfigError, minimum=1)
        for name in ("grace_s", "round_s", "extension_s"):
            _finite(name, getattr(self, name), ConfigError, minimum=0)
        for name in ("round_s", "extension_s"):
            if getattr(self, name) == 0:
                raise ConfigError(name, "must be more than 0 seconds")

    def quorum(self, enrolled: int) -> int:
        """K for a federation of ``enrolled`` sites: at least 1, at most the enrolled count."""
        wanted = self.quorum_count or math.ceil(round(self.quorum_fraction * enrolled, 9))
        return max(1, min(wanted, enrolled))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "RoundConfig":
        return from_mapping(cls, data)


@dataclass(frozen=True)
class AcceptedUpdate:
    site: str
    update_id: str
    samples: int
    steps: int
    partial: bool
    accepted_at: float

    def __post_init__(self) -> None:
        for name in ("site", "update_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise StateError(f"accepted.{name}", f"must be a non-empty string, got {getattr(self, name)!r}")
        _integer("accepted.samples", self.samples, StateError)
        _integer("accepted.steps", self.steps, StateError)
        if not isinstance(self.partial, bool):
            raise StateError("accepted.partial", f"must be true or false, got {self.partial!r}")
        _finite("accepted.accepted_at", self.accepted_at, StateError)


@dataclass(frozen=True)
class RoundState:
    federation: str
    round: int
    model_sha256: str  # the global model this round trains from
    config: RoundConfig
    opened_at: float
    deadline: float
    enrolled: frozenset[str]
    accepted: tuple[AcceptedUpdate, ...] = ()
    quorum_at: float | None = None  # when the K-th accepted update made quorum
    status: str = OPEN
    extensions: int = 0
    close_reason: str | None = None
    closed_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str) or not self.federation:
            raise StateError("federation", f"must be a non-empty string, got {self.federation!r}")
        _integer("round", self.round, StateError)
        _integer("extensions", self.extensions, StateError)
        if not isinstance(self.model_sha256, str) or not _SHA256.fullmatch(self.model_sha256):
            raise StateError("model_sha256", "must be 64 lowercase hex digits")
        for name in ("opened_at", "deadline", "quorum_at", "closed_at"):
            if getattr(self, name) is not None or name in ("opened_at", "deadline"):
                _finite(name, getattr(self, name), StateError)
        if self.status not in (OPEN, CLOSED):
            raise StateError("status", f"must be {OPEN!r} or {CLOSED!r}, got {self.status!r}")
        closed = self.status == CLOSED
        if closed != (self.close_reason is not None) or closed != (self.closed_at is not None):
            raise StateError("close_reason", "a closed round, and only a closed one, has a close reason and time")
        sites = [a.site for a in self.accepted]
        if len(set(sites)) != len(sites):
            raise StateError("accepted", "a site has more than one accepted update")
        if self.status == OPEN and not set(sites) <= self.enrolled:
            raise StateError("accepted", f"sites not enrolled: {sorted(set(sites) - self.enrolled)}")
        if self.status == OPEN and (self.quorum_at is not None) != (len(sites) >= self.quorum):
            raise StateError("quorum_at", f"must be set exactly when {self.quorum} updates are accepted")
        if self.status == CLOSED and not sites:
            raise StateError("accepted", "a round cannot close without an accepted update")

    @property
    def quorum(self) -> int:
        return self.config.quorum(len(self.enrolled))

    @property
    def all_reported(self) -> bool:
        return bool(self.enrolled) and self.enrolled <= {a.site for a in self.accepted}

    def accepted_from(self, site: str) -> AcceptedUpdate | None:
        return next((a for a in self.accepted if a.site == site), None)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["enrolled"] = sorted(self.enrolled)
        # Not dataclasses.asdict: it deep-copies every field, and this runs at every save of a
        # state that may count thousands of updates.
        names = [f.name for f in dataclasses.fields(AcceptedUpdate)]
        data["accepted"] = [{name: getattr(a, name) for name in names} for a in self.accepted]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "RoundState":
        """The state ``to_dict`` wrote (after a JSON round trip); a bad field raises StateError."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            missing = sorted(names - set(data)) if isinstance(data, dict) else sorted(names)
            raise StateError(missing[0] if missing else "fields", f"expected exactly the fields {sorted(names)}")
        try:
            values = dict(data)
            values["config"] = RoundConfig.from_dict(data["config"])
            values["enrolled"] = frozenset(_strings("enrolled", data["enrolled"]))
            values["accepted"] = tuple(AcceptedUpdate(**a) for a in data["accepted"])
        except ConfigError as e:
            raise StateError(f"config.{e.field}", e.why) from None
        except TypeError as e:  # an entry of "accepted" that is not a mapping of its fields
            raise StateError("accepted", str(e)) from None
        return cls(**values)


def _strings(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StateError(name, "must be a list of strings")
    return value


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


@dataclass(frozen=True)
class UpdateRejected:
    """An update the wire codec refused (bad signature, oversized, malformed...): ``reason`` is its code."""

    site: str  # from the topic: unauthenticated
    update_id: str | None
    reason: str
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
    site: str
    update_id: str | None
    round: int
    accepted: bool
    reason: str


@dataclass(frozen=True)
class LogEvent:
    """A line for the round log and the ``events`` topic."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


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
    reason: str
    accepted: tuple[AcceptedUpdate, ...]


Action = Union[StoreUpdate, SaveState, Ack, SendReceipt, LogEvent, Announce, CloseRound]

# The policy ---------------------------------------------------------------------------------------


@dataclass
class _Actions:
    """Actions gathered while handling one event; ``result`` puts them in the order the shell needs."""

    stored: list[StoreUpdate] = field(default_factory=list)
    rest: list[Action] = field(default_factory=list)

    def log(self, kind: str, state: RoundState, now: float, **fields: Any) -> None:
        self.rest.append(LogEvent(kind, {"round": state.round, "at": now, **fields}))

    def result(self, before: RoundState, after: RoundState) -> list[Action]:
        saved: list[Action] = [SaveState(after)] if after != before else []
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
        raise IllegalEvent(f"{type(event).__name__} is not allowed while round {state.round} is {state.status}")
    out = _Actions()
    new = _due(state, now, out)
    new = handler(new, event, now, out)
    new = _due(new, now, out)
    return new, out.result(state, new)


def _check_now(now: float) -> None:
    if not isinstance(now, (int, float)) or isinstance(now, bool) or not math.isfinite(now):
        raise IllegalEvent(f"now must be a finite number of seconds, got {now!r}")


def _evolve(state: RoundState, now: float, **changes: Any) -> RoundState:
    """``state`` with ``changes``, and ``quorum_at`` brought in line with them (invariant 3)."""
    values = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)} | changes
    if values["status"] == OPEN:
        reached = len(values["accepted"]) >= values["config"].quorum(len(values["enrolled"]))
        values["quorum_at"] = (values["quorum_at"] if values["quorum_at"] is not None else now) if reached else None
    return RoundState(**values)


def _opened(
    federation: str, round: int, model_sha256: str, enrolled: frozenset[str],
    config: RoundConfig, now: float, deadline: float | None, out: _Actions,
) -> RoundState:  # fmt: skip
    deadline = now + config.round_s if deadline is None else deadline
    if not isinstance(deadline, (int, float)) or not now < deadline < math.inf:
        raise IllegalEvent(f"round {round}: deadline {deadline!r} is not after now ({now})")
    state = RoundState(
        federation=federation, round=round, model_sha256=model_sha256, config=config,
        opened_at=now, deadline=deadline, enrolled=enrolled,
    )  # fmt: skip
    out.log("round_opened", state, now, model_sha256=model_sha256, deadline=deadline, quorum=state.quorum,
            enrolled=sorted(enrolled))  # fmt: skip
    out.rest.append(Announce(round, model_sha256, deadline, state.quorum))
    return state


def _due(state: RoundState, now: float, out: _Actions) -> RoundState:
    """Close or extend an open round if the rules say it is due by ``now``."""
    if state.status != OPEN:
        return state
    if state.all_reported:
        return _close(state, now, ALL_REPORTED, out)
    if state.quorum_at is not None:
        grace_end = state.quorum_at + state.config.grace_s
        if now >= min(grace_end, state.deadline):
            return _close(state, now, GRACE if grace_end < state.deadline else DEADLINE, out)
    elif now >= state.deadline:
        deadline = now + state.config.extension_s
        n, k = len(state.accepted), state.quorum
        out.log("deadline_extended", state, now, previous_deadline=state.deadline, deadline=deadline,
                accepted=n, quorum=k, why=f"{n} of the {k} updates needed had arrived by the deadline")  # fmt: skip
        out.rest.append(Announce(state.round, state.model_sha256, deadline, k))
        return _evolve(state, now, deadline=deadline, extensions=state.extensions + 1)
    return state


def _close(state: RoundState, now: float, reason: str, out: _Actions) -> RoundState:
    sites = [a.site for a in state.accepted]
    samples = sum(a.samples for a in state.accepted)
    out.log("round_closed", state, now, reason=reason, sites=sites, samples=samples, extensions=state.extensions)
    out.rest.append(CloseRound(state.round, reason, state.accepted))
    return _evolve(state, now, status=CLOSED, close_reason=reason, closed_at=now)


# An update that is not a re-delivery must pass these checks, in order; the first it fails names
# the reason on its rejected receipt.
_UPDATE_RULES: tuple[tuple[str, Callable[[RoundState, UpdateVerified], bool]], ...] = (
    (UNKNOWN_SITE, lambda s, e: e.site in s.enrolled),
    (STALE_ROUND, lambda s, e: e.round >= s.round),
    (UNKNOWN_ROUND, lambda s, e: e.round <= s.round),
    (ROUND_CLOSED, lambda s, e: s.status == OPEN),
    (WRONG_BASE_MODEL, lambda s, e: e.base_sha256 == s.model_sha256),
    (DUPLICATE_SITE, lambda s, e: s.accepted_from(e.site) is None),
    (NO_SAMPLES, lambda s, e: e.samples > 0),
)


def _on_update(state: RoundState, e: UpdateVerified, now: float, out: _Actions) -> RoundState:
    prior = state.accepted_from(e.site)
    if e.round == state.round and prior is not None and prior.update_id == e.update_id:
        out.rest += [Ack(e.site, e.update_id), SendReceipt(e.site, e.update_id, e.round, True, ACCEPTED)]
        out.log("update_redelivered", state, now, site=e.site, update_id=e.update_id)
        return state
    reason = next((reason for reason, holds in _UPDATE_RULES if not holds(state, e)), None)
    if reason is not None:
        return _reject(state, e.site, e.update_id, e.round, reason, now, out)
    entry = AcceptedUpdate(e.site, e.update_id, e.samples, e.steps, e.partial, now)
    out.stored.append(StoreUpdate(state.round, e.site, e.update_id))
    out.rest += [Ack(e.site, e.update_id), SendReceipt(e.site, e.update_id, e.round, True, ACCEPTED)]
    out.log("update_accepted", state, now, site=e.site, update_id=e.update_id, samples=e.samples, steps=e.steps,
            partial=e.partial)  # fmt: skip
    return _evolve(state, now, accepted=state.accepted + (entry,))


def _on_rejected(state: RoundState, e: UpdateRejected, now: float, out: _Actions) -> RoundState:
    return _reject(state, e.site, e.update_id, state.round if e.round is None else e.round, e.reason, now, out)


def _reject(
    state: RoundState, site: str, update_id: str | None, round: int, reason: str, now: float, out: _Actions
) -> RoundState:
    out.rest += [Ack(site, update_id), SendReceipt(site, update_id, round, False, reason)]
    out.log("update_rejected", state, now, site=site, update_id=update_id, update_round=round, reason=reason)
    return state


def _on_tick(state: RoundState, e: Tick, now: float, out: _Actions) -> RoundState:
    return state


def _on_enrolled(state: RoundState, e: SiteEnrolled, now: float, out: _Actions) -> RoundState:
    if e.site in state.enrolled:
        return state
    out.log("site_enrolled", state, now, site=e.site)
    return _evolve(state, now, enrolled=state.enrolled | {e.site})


def _on_revoked(state: RoundState, e: SiteRevoked, now: float, out: _Actions) -> RoundState:
    if e.site not in state.enrolled:
        return state
    out.log("site_revoked", state, now, site=e.site)
    dropped = state.accepted_from(e.site) if state.status == OPEN else None
    if dropped is not None:
        out.log("update_dropped", state, now, site=e.site, update_id=dropped.update_id, reason="site_revoked")
    kept = tuple(a for a in state.accepted if a is not dropped)
    return _evolve(state, now, enrolled=state.enrolled - {e.site}, accepted=kept)


def _on_open(state: RoundState, e: OpenRound, now: float, out: _Actions) -> RoundState:
    if e.round <= state.round:
        raise IllegalEvent(f"round {e.round} cannot follow round {state.round}")
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
_TRANSITIONS: dict[str, dict[type, _Handler]] = {
    OPEN: _ANY_STATUS,
    CLOSED: {**_ANY_STATUS, OpenRound: _on_open},
}
