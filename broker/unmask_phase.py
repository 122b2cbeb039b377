"""The unmasking phase of a secure round, as a pure state machine (``handle(state, event, now)``).

A secure round closes as any round (:mod:`.rounds`): its accepted masked updates are the
survivors, the roster's other sites are missing. Instead of aggregating at once, the coordinator
then asks each survivor for its answer (:mod:`fednca.secagg_round`) and decodes when the answers
suffice, or gives the round up at the unmask deadline (the model is kept, the next round opens).

Invariants:

1. ``survivors`` and ``missing`` are fixed when the phase begins and never change: every request
   of the round names the same two lists, so an honest site never answers two different ones.
2. ``answered`` only grows, and only with survivors; an answer from anyone else is refused
   (``Refuse``) and a second answer of a survivor is only acknowledged (``Ack``).
3. An answer is stored (``StoreAnswer``) before it is acknowledged, and ``Decode`` comes after the
   ``StoreAnswer`` that made the answers suffice: a coordinator killed at any instant finds every
   acknowledged answer on disk and comes to the same decision.
4. ``Decode`` and ``GiveUp`` end the phase (``done``); an event after that changes nothing.

Fewer survivors than the threshold, or than two, are never unmasked (``GiveUp`` at ``Begin``): their sum would
say too much about each, and honest sites refuse to answer such a request.

Readiness: with no site missing, every survivor's self-mask seed is known from its own answer or
from ``threshold`` shares in the others' answers (each answer holds one share of every other
survivor's seed); with sites missing, every survivor must answer, for only it can name its
pairwise seed with a missing site.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union

from .errors import IllegalRoundEvent


@dataclass(frozen=True)
class UnmaskState:
    round: int
    survivors: tuple[str, ...]
    missing: tuple[str, ...]
    threshold: int
    began_at: float
    timeout_s: float
    resend_s: float
    answered: frozenset[str] = frozenset()
    asked_at: float | None = None  # when the requests were last published
    done: bool = False

    def __post_init__(self) -> None:
        if set(self.survivors) & set(self.missing):
            raise IllegalRoundEvent(f"sites both survivor and missing: {sorted(set(self.survivors) & set(self.missing))}")
        if not self.survivors:
            raise IllegalRoundEvent("an unmasking phase needs at least one survivor")
        if not self.answered <= set(self.survivors):
            raise IllegalRoundEvent("answers counted from sites that are not survivors")

    @property
    def silent(self) -> tuple[str, ...]:
        return tuple(s for s in self.survivors if s not in self.answered)

    @property
    def ready(self) -> bool:
        silent = self.silent
        if not silent:
            return True
        return not self.missing and len(self.answered) >= self.threshold

    def lacking(self) -> str:
        """Why the answers do not suffice yet, in words for the round log."""
        silent = ", ".join(self.silent[:8]) + (" ..." if len(self.silent) > 8 else "")
        if self.missing:
            return (f"{len(self.silent)} survivor(s) did not answer ({silent}) while {len(self.missing)} site(s) "
                    "are missing: only a survivor can name its pair seeds with them")
        return f"{len(self.answered)} of {self.threshold} answers needed to rebuild the seeds of {silent}"


@dataclass(frozen=True)
class Begin:
    """The phase starts (or resumes after a restart): ask the survivors that have not answered."""


@dataclass(frozen=True)
class AnswerArrived:
    site: str


@dataclass(frozen=True)
class Tick:
    pass


Event = Union[Begin, AnswerArrived, Tick]


@dataclass(frozen=True)
class Request:
    sites: tuple[str, ...]  # publish the round's request to each


@dataclass(frozen=True)
class StoreAnswer:
    site: str


@dataclass(frozen=True)
class Ack:
    site: str


@dataclass(frozen=True)
class Refuse:
    site: str
    why: str


@dataclass(frozen=True)
class Decode:
    pass


@dataclass(frozen=True)
class GiveUp:
    why: str


Action = Union[Request, StoreAnswer, Ack, Refuse, Decode, GiveUp]


@dataclass
class _Out:
    actions: list[Action] = field(default_factory=list)


def handle(state: UnmaskState, event: Event, now: float) -> tuple[UnmaskState, list[Action]]:
    """The next state and the actions to perform, in order."""
    if state.done:
        return state, [Ack(event.site)] if isinstance(event, AnswerArrived) else []
    if isinstance(event, Begin):
        if len(state.survivors) < max(state.threshold, 2):  # honest sites refuse to answer such a request
            return replace(state, done=True), [GiveUp(f"{len(state.survivors)} survivor(s), fewer than the "
                                                      f"threshold {state.threshold} or 2")]
        if state.ready:
            return replace(state, done=True), [Decode()]
        return replace(state, asked_at=now), [Request(state.silent)]
    if isinstance(event, AnswerArrived):
        if event.site not in state.survivors:
            return state, [Refuse(event.site, "not a survivor of the round"), Ack(event.site)]
        if event.site in state.answered:
            return state, [Ack(event.site)]
        after = replace(state, answered=state.answered | {event.site})
        actions: list[Action] = [StoreAnswer(event.site), Ack(event.site)]
        if after.ready:
            return replace(after, done=True), [*actions, Decode()]
        return after, actions
    if isinstance(event, Tick):
        if state.ready:
            return replace(state, done=True), [Decode()]
        if now >= state.began_at + state.timeout_s:
            return replace(state, done=True), [GiveUp(f"unmask deadline passed: {state.lacking()}")]
        if state.asked_at is None or now >= state.asked_at + state.resend_s:
            return replace(state, asked_at=now), [Request(state.silent)]
        return state, []
    raise IllegalRoundEvent(f"unknown event {event!r}")
