"""What the in-memory broker keeps for each client: its session, apart from routing and delivery.

A session outlives its connection (``clean_start=False``): it holds the client's subscriptions,
the QoS 1 messages waiting for it (at most ``max_queued_messages``; newer ones are dropped and
counted, like mosquitto's), and the window of messages in flight, each under a packet id that is
unique among those in flight. :class:`fednca.transport.memory.MemoryBroker` decides who gets a
message and hands it over; the session only keeps the order and the counts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .memory_client import MemoryClient

PACKET_TOO_LARGE = 149  # MQTT v5 reason code
MAX_MID = 65535  # the largest MQTT packet id


@dataclass(frozen=True)
class Traffic:
    bytes_in: int  # PUBLISH bytes the broker received from the client
    bytes_out: int  # PUBLISH bytes the broker sent to the client


@dataclass(frozen=True)
class User:
    password: str
    role: str


@dataclass(frozen=True)
class Pending:
    """One message on its way: as published, or as a copy for one subscriber."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass
class Session:
    client_id: str
    username: str | None
    role: str | None
    clean: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    queue: deque[Pending] = field(default_factory=deque)
    inflight: dict[int, Pending] = field(default_factory=dict)
    next_mid: int = 1
    dropped: int = 0
    client: MemoryClient | None = None  # None while the client is offline

    def enqueue(self, pending: Pending, *, limit: int) -> bool:
        """Queue a QoS 1 message; False (and counted as dropped) when ``limit`` are waiting."""
        if len(self.queue) >= limit:
            self.dropped += 1
            return False
        self.queue.append(pending)
        return True

    def release(self, *, window: int) -> Iterator[tuple[int, Pending]]:
        """Move waiting messages in flight, in order, while the client is online and fewer than
        ``window`` are in flight; yields each with its packet id, for the broker to deliver."""
        while self.client is not None and self.queue and len(self.inflight) < window:
            pending = self.queue.popleft()
            mid = self._new_mid()
            self.inflight[mid] = pending
            yield mid, pending

    def settle(self, mid: int) -> bool:
        """The client acknowledged ``mid``; whether it was in flight (a slot is free again)."""
        return self.inflight.pop(mid, None) is not None

    def _new_mid(self) -> int:
        while True:
            mid = self.next_mid
            self.next_mid = mid % MAX_MID + 1
            if mid not in self.inflight:
                return mid
