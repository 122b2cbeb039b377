"""The broker package's exceptions, under one root.

:class:`BrokerError` is the root of every error the coordinator side raises on purpose, so that a
caller (the ``fednca-coordinator`` command, the demo) can tell them from a bug with one ``except``.
The names say which part of the coordinator refused: they do not collide with the edge daemon's
own ``StateError`` and ``IllegalEvent``, which mean other things.

None of these is raised for what a peer sends: a site's garbage becomes a rejected receipt.
"""

from __future__ import annotations

from fednca.errors import FedNCAError


class BrokerError(FedNCAError):
    """Root of the coordinator side's errors."""


class RoundError(BrokerError):
    """Root of the round policy's errors."""


class IllegalRoundEvent(RoundError):
    """The event makes no sense in this round state (a mistake of the shell or the operator, such
    as opening a round while one is open); the state is left as it was."""


class RoundStateError(RoundError, ValueError):
    """A round state (built in code or read back from disk) breaks an invariant; names the field."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"round state {field}: {why}")
        self.field = field
        self.why = why


class StoreError(BrokerError):
    """A file of the round store is missing, damaged or would be misplaced; the message names it."""


class CoordinatorError(BrokerError):
    """The coordinator was used out of order (stepped before start, started twice), or its store
    and its messages disagree in a way that only a bug could cause."""
