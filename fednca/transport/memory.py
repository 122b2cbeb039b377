"""An MQTT broker in memory, for the one-process demo and for tests, with the same interface.

It keeps the guarantees that matter to the protocol, as mosquitto does:

- topic wildcards (paho's own matcher), one delivery per client at the highest matching QoS;
- retained messages, sent (flagged ``retain``) on every subscribe; an empty payload clears one;
- QoS 1 at least once: a delivered message stays in flight until the receiver calls ``ack``; at
  most ``max_inflight_messages`` are in flight per client, the rest wait in order; after a
  reconnect the in-flight ones come again flagged ``dup``. ``duplicate_probability`` (seeded)
  sends some QoS 1 messages twice, to prove that receivers tolerate it;
- persistent sessions (``clean_start=False``, the default): subscriptions and QoS 1 messages wait
  for an offline client, at most ``max_queued_messages`` of them (newer ones are dropped and
  counted, like mosquitto's ``max_queued_messages``); QoS 0 for an offline client is dropped;
  a ``clean_start=True`` session ends when its connection does;
- the last will is published when a connection ends without a clean disconnect;
- users with a password and a role; the ACL of :func:`fednca.topics.allowed`: a denied publish is
  dropped and its handle settles with reason 135 (as MQTT v5); a denied subscribe is refused
  (mosquitto 2.0 grants it and filters each message instead: either way nothing leaks);
- a maximum packet size: a client that sends more is disconnected, its will published;
- bytes of PUBLISH packets counted per client id, in and out.

Faults for tests: :meth:`MemoryBroker.stop` / :meth:`start` / :meth:`restart` (sessions and
retained messages survive, like mosquitto with persistence), :meth:`MemoryBroker.drop` (one
connection cut) and :meth:`MemoryClient.kill` (a client process dies). Reconnection happens when the
broker runs again, in the thread that calls ``start`` or ``drop``: no timers, no sleeping.
Everything runs under one lock and nothing blocks under it.
"""

from __future__ import annotations

import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field


from .. import topics
from .base import (
    DEFAULT_MAX_PACKET_SIZE,
    NOT_AUTHORIZED,
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

PACKET_TOO_LARGE = 149  # MQTT v5 reason code
_MAX_MID = 65535


@dataclass(frozen=True)
class Traffic:
    bytes_in: int  # PUBLISH bytes the broker received from the client
    bytes_out: int  # PUBLISH bytes the broker sent to the client


@dataclass(frozen=True)
class _User:
    password: str
    role: str


@dataclass(frozen=True)
class _Pending:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass
class _Session:
    client_id: str
    username: str | None
    role: str | None
    clean: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    queue: deque[_Pending] = field(default_factory=deque)
    inflight: dict[int, _Pending] = field(default_factory=dict)
    next_mid: int = 1
    dropped: int = 0
    client: MemoryClient | None = None


class MemoryBroker:
    """A thread-safe broker in this process. Without users it is open to anyone with no ACL;
    once a user is added every client must log in and the federation's ACL applies."""

    def __init__(
        self,
        *,
        federation: str | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        max_queued_messages: int = 1000,
        max_inflight_messages: int = 20,
        duplicate_probability: float = 0.0,
        seed: int = 0,
    ) -> None:
        if federation is not None:
            topics.check_id(federation, what="federation")
        self.federation = federation
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.duplicate_probability = duplicate_probability
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._users: dict[str, _User] = {}
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Pending] = {}
        self._traffic: dict[str, list[int]] = {}
        self._waiting: list[MemoryClient] = []  # lost their connection; reconnect on start()
        self._running = True

    # -- set-up -------------------------------------------------------------------------------

    def add_user(self, username: str, *, password: str, role: str) -> None:
        if self.federation is None:
            raise TransportError("a broker with users needs a federation for its ACL")
        if role == topics.SITE:
            topics.check_id(username, what="site")
        elif role != topics.COORDINATOR:
            raise TransportError(f"user {username!r}: role {role!r} is not one of {topics.ROLES}")
        with self._lock:
            self._users[username] = _User(password=password, role=role)

    def client(
        self,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        clean_start: bool = False,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> MemoryClient:
        """A client of this broker (not yet connected)."""
        return MemoryClient(
            broker=self,
            client_id=client_id,
            username=username,
            password=password,
            will=will,
            clean_start=clean_start,
            max_packet_size=max_packet_size,
        )

    # -- faults -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def stop(self) -> None:
        """The broker goes away: every connection is lost, and no will is sent."""
        with self._lock:
            self._running = False
            for session in list(self._sessions.values()):
                if session.client is not None:
                    client = session.client
                    self._end_connection(session)
                    client._lost(reconnect=True)

    def start(self) -> None:
        """The broker is back: clients that lost their connection reconnect, oldest loss first."""
        with self._lock:
            self._running = True
            waiting, self._waiting = self._waiting, []
            for client in waiting:
                client._reconnect()

    def restart(self) -> None:
        self.stop()
        self.start()

    def drop(self, client_id: str, *, reconnect: bool = True) -> None:
        """Cut one client's connection without a DISCONNECT (its will is published)."""
        with self._lock:
            session = self._sessions.get(client_id)
            if session is None or session.client is None:
                raise NotConnected(f"client {client_id!r} is not connected")
            client = session.client
            self._close(client, graceful=False)
            client._lost(reconnect=reconnect)
            if reconnect and self._running:
                self._waiting.remove(client)
                client._reconnect()

    # -- inspection ---------------------------------------------------------------------------

    def traffic(self, client_id: str) -> Traffic:
        with self._lock:
            bytes_in, bytes_out = self._traffic.get(client_id, (0, 0))
            return Traffic(bytes_in=bytes_in, bytes_out=bytes_out)

    def retained(self, topic: str) -> bytes | None:
        with self._lock:
            held = self._retained.get(topic)
            return None if held is None else held.payload

    def queued(self, client_id: str) -> int:
        """Messages waiting at the broker for this client (offline or over the in-flight window)."""
        with self._lock:
            session = self._sessions.get(client_id)
            return 0 if session is None else len(session.queue)

    def dropped(self, client_id: str) -> int:
        """Messages dropped because this client's queue was full."""
        with self._lock:
            session = self._sessions.get(client_id)
            return 0 if session is None else session.dropped

    # -- protocol (called by MemoryClient, under the lock) ---------------------------------------

    def _open(self, client: MemoryClient) -> bool:
        """Accept a connection; return whether an earlier session was resumed."""
        if not self._running:
            raise NotConnected("broker memory:// is not running")
        role = self._authenticate(client)
        session = self._sessions.get(client.client_id)
        if session is not None and session.client is not None:  # takeover: the old one is cut off
            old = session.client
            self._close(old, graceful=False)
            old._lost(reconnect=False)
            session = self._sessions.get(client.client_id)
        present = session is not None and not client.clean_start
        if not present:
            session = _Session(client.client_id, client.username, role, client.clean_start)
            self._sessions[client.client_id] = session
        assert session is not None
        session.client = client
        self._traffic.setdefault(client.client_id, [0, 0])
        for mid, pending in session.inflight.items():
            self._deliver(session, pending, mid=mid, dup=True)
        self._pump(session)
        return present

    def _authenticate(self, client: MemoryClient) -> str | None:
        if not self._users:
            return None
        user = self._users.get(client.username or "")
        if user is None or user.password != client.password:
            raise ConnectRefused("memory://", "bad user name or password")
        return user.role

    def _close(self, client: MemoryClient, *, graceful: bool) -> None:
        session = self._sessions.get(client.client_id)
        if session is None or session.client is not client:
            return
        self._end_connection(session)
        will = client.will
        if not graceful and will is not None and self._may(session, "write", will.topic):
            self._route(_Pending(will.topic, will.payload, will.qos, will.retain))

    def _end_connection(self, session: _Session) -> None:
        session.client = None
        if session.clean:
            del self._sessions[session.client_id]

    def _session_of(self, client: MemoryClient) -> _Session:
        session = self._sessions.get(client.client_id)
        if session is None or session.client is not client:
            raise NotConnected(f"client {client.client_id!r} is not connected")
        return session

    def _may(self, session: _Session, action: topics.Action, topic: str) -> bool:
        if not self._users:
            return True
        assert self.federation is not None and session.role is not None
        return topics.allowed(
            user=session.username or "",
            role=session.role,
            action=action,
            topic=topic,
            federation=self.federation,
        )

    def _subscribe(self, client: MemoryClient, topic_filter: str, qos: int) -> None:
        session = self._session_of(client)
        if not self._may(session, "subscribe", topic_filter):
            raise SubscribeRefused(topic_filter, "not authorized")
        session.subscriptions[topic_filter] = qos
        for topic, held in list(self._retained.items()):
            if topics.matches(topic_filter, topic) and self._may(session, "read", topic):
                self._enqueue(session, _Pending(topic, held.payload, min(qos, held.qos), True))

    def _unsubscribe(self, client: MemoryClient, topic_filter: str) -> None:
        self._session_of(client).subscriptions.pop(topic_filter, None)

    def _publish(self, client: MemoryClient, pending: _Pending) -> int | None:
        """Route one message; the reason code, or None when the client was cut off instead."""
        session = self._session_of(client)
        size = publish_packet_size(pending.topic, len(pending.payload), pending.qos)
        self._traffic[client.client_id][0] += size
        if size > self.max_packet_size:
            self._close(client, graceful=False)
            client._lost(reconnect=False)
            return None
        if not self._may(session, "write", pending.topic):
            return NOT_AUTHORIZED
        self._route(pending)
        return 0

    def _route(self, pending: _Pending) -> None:
        if pending.retain:
            if pending.payload:
                self._retained[pending.topic] = pending
            else:
                self._retained.pop(pending.topic, None)
        for session in list(self._sessions.values()):
            granted = [
                q for f, q in session.subscriptions.items() if topics.matches(f, pending.topic)
            ]
            if granted and self._may(session, "read", pending.topic):
                qos = min(pending.qos, max(granted))
                self._enqueue(session, _Pending(pending.topic, pending.payload, qos, False))

    def _enqueue(self, session: _Session, pending: _Pending) -> None:
        if session.client is None and pending.qos == 0:
            return
        if pending.qos == 0:
            self._deliver(session, pending, mid=0, dup=False)
            return
        if len(session.queue) >= self.max_queued_messages:
            session.dropped += 1
            return
        session.queue.append(pending)
        self._pump(session)

    def _pump(self, session: _Session) -> None:
        while (
            session.client is not None
            and session.queue
            and len(session.inflight) < self.max_inflight_messages
        ):
            pending = session.queue.popleft()
            mid = self._next_mid(session)
            session.inflight[mid] = pending
            self._deliver(session, pending, mid=mid, dup=False)

    def _next_mid(self, session: _Session) -> int:
        while True:
            mid = session.next_mid
            session.next_mid = mid % _MAX_MID + 1
            if mid not in session.inflight:
                return mid

    def _deliver(self, session: _Session, pending: _Pending, *, mid: int, dup: bool) -> None:
        client = session.client
        assert client is not None
        token = (client.epoch, mid) if pending.qos else None
        copies = 1
        if pending.qos and self._rng.random() < self.duplicate_probability:
            copies = 2
        for copy in range(copies):
            message = Message(
                topic=pending.topic,
                payload=pending.payload,
                qos=pending.qos,
                retain=pending.retain,
                dup=dup or copy > 0,
                ack_token=token,
            )
            self._traffic[session.client_id][1] += publish_packet_size(
                pending.topic, len(pending.payload), pending.qos
            )
            client._hand_over(message)

    def _ack(self, client: MemoryClient, token: object) -> None:
        session = self._sessions.get(client.client_id)
        if session is None or session.client is not client:
            return
        epoch, mid = token  # type: ignore[misc]
        if epoch != client.epoch:
            return  # received on an earlier connection: it has been sent again since
        if session.inflight.pop(mid, None) is not None:
            self._pump(session)


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
        self.last_error: TransportError | None = None
        self._state = "new"  # new | connected | lost | closed | dead
        self._outbox: list[tuple[PublishHandle, _Pending]] = []

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
            self._broker._open(self)
        except ConnectRefused:
            self._state = "closed"
            raise
        self._state = "connected"
        self._max_packet_size = min(self._max_packet_size, self._broker.max_packet_size)
        for topic_filter, qos in self.subscriptions.items():
            try:
                self._broker._subscribe(self, topic_filter, qos)
            except SubscribeRefused as e:
                with self._sub_lock:
                    self._subscriptions.pop(topic_filter, None)
                self.last_error = e
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
        pending = _Pending(topic, bytes(payload), qos, retain)
        with self._lock:
            if self._state == "connected":
                self._send(handle, pending)
            elif qos == 0 or self._state == "dead":
                raise NotConnected(f"client {self.client_id!r} is offline: {topic!r} not sent")
            else:
                self._outbox.append((handle, pending))
        return handle

    def _send(self, handle: PublishHandle, pending: _Pending) -> None:
        limit = self.max_packet_size
        if publish_packet_size(pending.topic, len(pending.payload), pending.qos) > limit:
            handle.settle(PACKET_TOO_LARGE)  # queued before the broker's maximum was known
            return
        reason = self._broker._publish(self, pending)
        if reason is not None:
            handle.settle(reason)

    def ack(self, message: Message) -> None:
        if message.qos == 0 or message.ack_token is None:
            return
        with self._lock:
            self._broker._ack(self, message.ack_token)

    @property
    def bytes_sent(self) -> int:
        return self._broker.traffic(self.client_id).bytes_in

    @property
    def bytes_received(self) -> int:
        return self._broker.traffic(self.client_id).bytes_out
