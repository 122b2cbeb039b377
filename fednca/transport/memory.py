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
- sessions bound to users (as mosquitto's ``use_username_as_clientid``): a client id that names
  another user, or whose session another user made, is refused (:class:`ConnectRefused`);
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

The broker's per-client state lives in :mod:`.memory_session`, its client in :mod:`.memory_client`;
this module routes, enforces the ACL and injects the faults.
"""

from __future__ import annotations

import random
import threading

from .. import topics
from .base import (
    DEFAULT_MAX_PACKET_SIZE,
    NOT_AUTHORIZED,
    ConnectRefused,
    Message,
    NotConnected,
    SubscribeRefused,
    TransportError,
    Will,
    publish_packet_size,
)
from .memory_client import MemoryClient
from .memory_session import PACKET_TOO_LARGE, Pending, Session, Traffic, User

__all__ = ["MemoryBroker", "MemoryClient", "PACKET_TOO_LARGE", "Traffic"]


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
        self._users: dict[str, User] = {}
        self._sessions: dict[str, Session] = {}
        self._retained: dict[str, Pending] = {}
        self._traffic: dict[str, list[int]] = {}
        self._waiting: list[MemoryClient] = []  # lost their connection; reconnect on start()
        self._running = True

    # -- set-up -------------------------------------------------------------------------------

    def add_user(self, username: str, *, password: str, role: str) -> None:
        if self.federation is None:
            raise TransportError("a broker with users needs a federation for its ACL")
        if role == topics.SITE:
            topics.check_id(username, what="site")
        elif role not in topics.ROLES:
            raise TransportError(f"user {username!r}: role {role!r} is not one of {topics.ROLES}")
        with self._lock:
            self._users[username] = User(password=password, role=role)

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
        self._check_owner(client, session)
        if session is not None and session.client is not None:  # takeover: the old one is cut off
            old = session.client
            self._close(old, graceful=False)
            old._lost(reconnect=False)
            session = self._sessions.get(client.client_id)
        present = session is not None and not client.clean_start
        if not present:
            session = Session(client.client_id, client.username, role, client.clean_start)
            self._sessions[client.client_id] = session
        assert session is not None
        session.client = client
        self._traffic.setdefault(client.client_id, [0, 0])
        for mid, pending in session.inflight.items():
            self._deliver(session, pending, mid=mid, dup=True)
        self._pump(session)
        return present

    def _check_owner(self, client: MemoryClient, session: Session | None) -> None:
        """A client id belongs to its user: one that names another user, or whose session another
        user made, is refused, so no user can take over (or squat) another's session. A user may
        still take over its own session (a restarted process does)."""
        if not self._users:
            return
        owner = session.username if session is not None else None
        if owner is None and client.client_id in self._users:
            owner = client.client_id
        if owner is not None and owner != client.username:
            raise ConnectRefused("memory://", f"client id {client.client_id!r} is bound to another user "
                                 f"({owner!r}); {client.username!r} may not use it")

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
            self._route(Pending(will.topic, will.payload, will.qos, will.retain))

    def _end_connection(self, session: Session) -> None:
        session.client = None
        if session.clean:
            del self._sessions[session.client_id]

    def _session_of(self, client: MemoryClient) -> Session:
        session = self._sessions.get(client.client_id)
        if session is None or session.client is not client:
            raise NotConnected(f"client {client.client_id!r} is not connected")
        return session

    def _may(self, session: Session, action: topics.Action, topic: str) -> bool:
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
                self._enqueue(session, Pending(topic, held.payload, min(qos, held.qos), True))

    def _unsubscribe(self, client: MemoryClient, topic_filter: str) -> None:
        self._session_of(client).subscriptions.pop(topic_filter, None)

    def _publish(self, client: MemoryClient, pending: Pending) -> int | None:
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

    def _route(self, pending: Pending) -> None:
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
                self._enqueue(session, Pending(pending.topic, pending.payload, qos, False))

    def _enqueue(self, session: Session, pending: Pending) -> None:
        if session.client is None and pending.qos == 0:
            return
        if pending.qos == 0:
            self._deliver(session, pending, mid=0, dup=False)
            return
        if session.enqueue(pending, limit=self.max_queued_messages):
            self._pump(session)

    def _pump(self, session: Session) -> None:
        for mid, pending in session.release(window=self.max_inflight_messages):
            self._deliver(session, pending, mid=mid, dup=False)

    def _deliver(self, session: Session, pending: Pending, *, mid: int, dup: bool) -> None:
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
        if session.settle(mid):
            self._pump(session)
