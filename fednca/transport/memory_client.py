"""The client of the in-memory broker: the :class:`fednca.transport.base.Client` interface over
direct calls into a :class:`fednca.transport.memory.MemoryBroker`, under the broker's lock.

Like paho with a persistent session, it keeps QoS 1 messages published while offline and sends
them, in order, once connected again; on reconnect it subscribes again as the MQTT client does
(every filter for a new session, only the unconfirmed ones when the broker kept the session).
``kill`` stands for the client's process dying: nothing it held survives.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING

from .base import (
    Client,
    ConnectRefused,
    Message,
    NotConnected,
    PublishHandle,
    SubscribeRefused,
    TransportError,
    Will,
    check_publish,
    publish_packet_size,
)
from .memory_session import PACKET_TOO_LARGE, Pending

if TYPE_CHECKING:
    from .memory import MemoryBroker


class MemoryClient(Client):
    """A client of a :class:`MemoryBroker`; see :class:`fednca.transport.base.Client`."""

    def __init__(
        self,
        *,
        broker: MemoryBroker,
        client_id: str,
        username: str | None,
        password: str | None,
        will: Will | None,
        clean_start: bool,
        max_packet_size: int,
    ) -> None:
        super().__init__(client_id=client_id, will=will, max_packet_size=max_packet_size)
        self._broker = broker
        self._lock = broker._lock
        self.username = username
        self.password = password
        self.clean_start = clean_start
        self.epoch = 0
        self._connections = 0  # connections made (refused attempts not counted)
        self.last_error: TransportError | None = None
        self._state = "new"  # new | connected | lost | closed | dead
        self._outbox: list[tuple[PublishHandle, Pending]] = []
        self._rtt: float | None = None

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    def connect(self, timeout: float = 10.0) -> bool:
        with self._lock:
            if self._state == "dead":
                raise NotConnected(f"client {self.client_id!r} was killed")
            if self._state == "connected":
                return True
            self._state = "lost"
            if not self._broker.running:
                if self not in self._broker._waiting:
                    self._broker._waiting.append(self)
                return False
            self._open()
            return True

    def _open(self) -> None:
        self.epoch += 1  # before the broker resends what is in flight, so its acks count
        try:
            present = self._broker._open(self)
        except ConnectRefused:
            self._state = "closed"
            raise
        self._state = "connected"
        self._connections += 1
        self._max_packet_size = min(self._max_packet_size, self._broker.max_packet_size)
        subscriptions, dropped = self._resubscriptions(session_present=present)
        for topic_filter in dropped:
            self._broker._unsubscribe(self, topic_filter)
        for topic_filter, qos in subscriptions.items():
            try:
                self._broker._subscribe(self, topic_filter, qos)
            except SubscribeRefused as e:
                with self._sub_lock:
                    self._subscriptions.pop(topic_filter, None)
                self.last_error = e
            else:
                self._confirm(topic_filter)
        outbox, self._outbox = self._outbox, []
        for handle, pending in outbox:
            self._send(handle, pending)

    def _reconnect(self) -> None:
        """The broker is reachable again (called by the broker, under its lock)."""
        if self._state != "lost":
            return
        try:
            self._open()
        except ConnectRefused as e:
            self.last_error = e

    def _lost(self, *, reconnect: bool) -> None:
        """The connection ended without our asking (called by the broker, under its lock)."""
        if self._state != "connected":
            return
        self._state = "lost" if reconnect else "closed"
        if reconnect:
            self._broker._waiting.append(self)

    def disconnect(self) -> None:
        with self._lock:
            if self._state == "connected":
                self._broker._close(self, graceful=True)
            elif self in self._broker._waiting:
                self._broker._waiting.remove(self)
            if self._state != "dead":
                self._state = "closed"

    def kill(self) -> None:
        with self._lock:
            if self._state == "connected":
                self._broker._close(self, graceful=False)
            elif self in self._broker._waiting:
                self._broker._waiting.remove(self)
            self._state = "dead"
            self._outbox.clear()
            self._inbox = queue.SimpleQueue()  # the process's memory is gone with it

    def _send_subscribe(self, topic_filter: str, qos: int, timeout: float) -> None:
        with self._lock:
            self._broker._subscribe(self, topic_filter, qos)  # NotConnected when offline

    def _send_unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._broker._unsubscribe(self, topic_filter)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        check_publish(topic, payload, qos, self.max_packet_size)
        handle = PublishHandle(topic)
        pending = Pending(topic, bytes(payload), qos, retain)
        with self._lock:
            if self._state == "connected":
                self._send(handle, pending)
            elif qos == 0 or self._state == "dead":
                raise NotConnected(f"client {self.client_id!r} is offline: {topic!r} not sent")
            else:
                self._outbox.append((handle, pending))
        return handle

    def _send(self, handle: PublishHandle, pending: Pending) -> None:
        limit = self.max_packet_size
        if publish_packet_size(pending.topic, len(pending.payload), pending.qos) > limit:
            handle.settle(PACKET_TOO_LARGE)  # queued before the broker's maximum was known
            return
        reason = self._broker._publish(self, pending)
        if reason is not None:
            if pending.qos and reason < 128:
                self._rtt = 0.0  # in memory the broker answers at once
            handle.settle(reason)

    def ack(self, message: Message) -> None:
        if message.qos == 0 or message.ack_token is None:
            return
        with self._lock:
            self._broker._ack(self, message.ack_token)

    @property
    def last_rtt_s(self) -> float | None:
        return self._rtt

    @property
    def bytes_sent(self) -> int:
        return self._broker.traffic(self.client_id).bytes_in

    @property
    def bytes_received(self) -> int:
        return self._broker.traffic(self.client_id).bytes_out
