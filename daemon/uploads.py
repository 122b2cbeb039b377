"""The daemon's updates on their way to the broker: each publish of a stored update until the
broker answers it.

A QoS 1 message that the broker has not acknowledged stays in the client's memory and goes out
again by itself after a reconnect, resuming the upload where the session left it (the transport's
guarantee, docs/transport.md). The lifecycle also publishes a stored update again when no receipt
came for a while (a broker that took it and then lost it); doing so while the earlier copy still
waits in the client would put a second copy of the same update on the link: on a 64 kbit/s link a
16 KB update is two more seconds per copy, and a long outage would pile one copy up per resend.
So :meth:`Uploads.in_flight` tells the shell to skip a resend while a copy of that update is
still unanswered; once the broker has taken it (PUBACK) and still no receipt comes, or after a
restart (the client's memory is gone), the update is published again from the outbox as before.

Only the daemon's own bookkeeping: no I/O, no clock; the handles are the transport's.
"""

from __future__ import annotations

from dataclasses import dataclass

from fednca.transport.base import PublishHandle

__all__ = ["Upload", "Uploads"]


@dataclass(frozen=True, kw_only=True)
class Upload:
    handle: PublishHandle
    round: int
    update_id: str


class Uploads:
    """The publishes of stored updates that the shell has not yet looked at since the broker answered."""

    def __init__(self) -> None:
        self._sent: list[Upload] = []

    def add(self, handle: PublishHandle, *, round: int, update_id: str) -> None:
        self._sent.append(Upload(handle=handle, round=round, update_id=update_id))

    def in_flight(self, round: int, update_id: str) -> bool:
        """True while a copy of this update waits in the client for the broker's answer."""
        return any(not u.handle.done and (u.round, u.update_id) == (round, update_id) for u in self._sent)

    def answered(self) -> list[Upload]:
        """The publishes the broker has answered since the last call (taken or refused), oldest first."""
        done: list[Upload] = []
        waiting: list[Upload] = []
        for u in self._sent:  # one look at each handle: it may settle meanwhile (the network thread)
            (done if u.handle.done else waiting).append(u)
        self._sent = waiting
        return done

    def __len__(self) -> int:
        return len(self._sent)
