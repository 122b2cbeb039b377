"""The one client interface that the daemon and the coordinator speak, whatever carries it.

Guarantees every implementation keeps:

- ``publish`` returns a :class:`PublishHandle` at once; it settles when the broker has answered
  (QoS 1: PUBACK; QoS 0: written out). A QoS 1 message published while the connection is down
  waits in memory and goes out after the reconnect; that memory dies with the process, so keep
  anything precious in an outbox on disk as well.
- The payload size is checked before anything is sent: :class:`PayloadTooLarge` names the topic
  and the sizes (a broker disconnects a client that exceeds its maximum packet size, and the
  client would resend the same message forever).
- Incoming messages are put on a queue by the network side and taken with ``receive``; nothing
  ever blocks the network side.
- QoS 1 messages are acknowledged to the broker only by ``ack``: call it once the message is
  stored (or judged worthless). Until then the broker keeps it in flight and sends it again after
  a reconnect, flagged ``dup``. Delivery is at least once: ack every message you receive,
  duplicates included, or the broker stops sending once its in-flight window is full.
- Subscriptions are remembered and made again after a reconnect that starts a new session
  (retained messages of a filter therefore arrive again then). When the broker kept the session,
  it still holds them and sends what was queued and what was in flight: only subscriptions it
  never confirmed are made again, so a retained message (a whole model, on a slow link) does not
  come a second time beside the queued copy (:meth:`Client._resubscriptions`).
- Link counters for the telemetry: PUBLISH bytes sent and received, ``reconnects`` and
  ``last_rtt_s`` (PUBLISH to PUBACK of the last QoS 1 message sent on a live connection).
- Sessions are persistent by default: QoS 1 messages for a disconnected client wait at the broker.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..errors import FedNCAError

DEFAULT_MAX_PACKET_SIZE = 1_048_576  # bytes; mosquitto is configured with the same maximum
NOT_AUTHORIZED = 135  # MQTT v5 reason code a broker answers to a publish its ACL denies
QOS_LEVELS = (0, 1)


class TransportError(FedNCAError):
    """Root of the transport's errors."""


class ConnectRefused(TransportError):
    """The broker refused the connection for a reason retrying will not fix (credentials, ACL)."""

    def __init__(self, broker: str, reason: str) -> None:
        super().__init__(f"broker {broker} refused the connection: {reason}")
        self.broker = broker
        self.reason = reason


class NotConnected(TransportError):
    """The operation needs a live connection and there is none."""


class InvalidTopic(TransportError, ValueError):
    """A topic or filter is not usable for the operation (empty, wildcard in a publish...)."""


class PayloadTooLarge(TransportError, ValueError):
    """A payload would make a packet larger than the broker accepts; nothing was sent."""

    def __init__(self, *, topic: str, payload_size: int, packet_size: int, limit: int) -> None:
        super().__init__(
            f"payload of {payload_size} bytes for topic {topic!r} makes a {packet_size}-byte "
            f"packet, over the {limit}-byte maximum packet size"
        )
        self.topic = topic
        self.payload_size = payload_size
        self.packet_size = packet_size
        self.limit = limit


class SubscribeRefused(TransportError):
    def __init__(self, topic_filter: str, reason: str) -> None:
        super().__init__(f"broker refused the subscription {topic_filter!r}: {reason}")
        self.topic_filter = topic_filter
        self.reason = reason


class PublishRefused(TransportError):
    def __init__(self, topic: str, reason_code: int) -> None:
        why = "not authorized" if reason_code == NOT_AUTHORIZED else f"reason code {reason_code}"
        super().__init__(f"broker refused the message on {topic!r}: {why}")
        self.topic = topic
        self.reason_code = reason_code


class PublishTimeout(TransportError):
    def __init__(self, topic: str, timeout: float) -> None:
        super().__init__(f"broker did not acknowledge the message on {topic!r} within {timeout} s")
        self.topic = topic
        self.timeout = timeout


@dataclass(frozen=True)
class Message:
    """A received message. ``ack_token`` belongs to the client that received it."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    ack_token: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Will:
    """Published by the broker for a client whose connection ends without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        check_topic(self.topic)
        if self.qos not in QOS_LEVELS:
            raise InvalidTopic(f"will on {self.topic!r}: qos {self.qos} is not 0 or 1")


class PublishHandle:
    """Completion of one publish: settled once the broker has answered."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._settled = threading.Event()
        self._reason_code: int | None = None

    def settle(self, reason_code: int) -> None:
        """Record the broker's answer (0 = accepted, >= 128 = refused). For implementations."""
        if not self._settled.is_set():
            self._reason_code = int(reason_code)
            self._settled.set()

    @property
    def done(self) -> bool:
        return self._settled.is_set()

    @property
    def reason_code(self) -> int | None:
        return self._reason_code

    @property
    def accepted(self) -> bool:
        return self.done and self._reason_code is not None and self._reason_code < 128

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once the broker has answered (accepted or not)."""
        return self._settled.wait(timeout)

    def result(self, timeout: float) -> None:
        """Return once accepted; raise :class:`PublishTimeout` or :class:`PublishRefused`."""
        if not self._settled.wait(timeout):
            raise PublishTimeout(self.topic, timeout)
        if not self.accepted:
            raise PublishRefused(self.topic, self._reason_code or 0)

    def __repr__(self) -> str:
        state = "pending" if not self.done else f"reason={self._reason_code}"
        return f"PublishHandle({self.topic!r}, {state})"


def _varint_len(n: int) -> int:
    length = 1
    while n >= 128:
        n //= 128
        length += 1
    return length


def publish_packet_size(topic: str, payload_size: int, qos: int) -> int:
    """Bytes of an MQTT v5 PUBLISH packet without properties (v3.1.1 is one byte less)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + payload_size
    return 1 + _varint_len(remaining) + remaining


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not topic:
        raise InvalidTopic(f"topic {topic!r} must be a non-empty string")
    if "+" in topic or "#" in topic or "\0" in topic:
        raise InvalidTopic(f"topic {topic!r}: a message cannot be published to a wildcard")
    return topic


def check_filter(topic_filter: object) -> str:
    if not isinstance(topic_filter, str) or not topic_filter or "\0" in topic_filter:
        raise InvalidTopic(f"topic filter {topic_filter!r} must be a non-empty string")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        bad_plus = "+" in level and level != "+"
        bad_hash = "#" in level and (level != "#" or i != len(levels) - 1)
        if bad_plus or bad_hash:
            raise InvalidTopic(f"topic filter {topic_filter!r} has a misplaced wildcard")
    return topic_filter


def check_publish(topic: str, payload: bytes, qos: int, limit: int) -> int:
    """Validate a publish before anything is sent; return the packet size."""
    check_topic(topic)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise InvalidTopic(f"payload for {topic!r} must be bytes, not {type(payload).__name__}")
    if qos not in QOS_LEVELS:
        raise InvalidTopic(f"publish to {topic!r}: qos {qos} is not 0 or 1")
    size = publish_packet_size(topic, len(payload), qos)
    if size > limit:
        raise PayloadTooLarge(topic=topic, payload_size=len(payload), packet_size=size, limit=limit)
    return size


class Client(ABC):
    """A connection to one broker. Implementations: memory.MemoryClient, mqtt.MqttClient."""

    def __init__(self, *, client_id: str, will: Will | None, max_packet_size: int) -> None:
        if not client_id:
            raise InvalidTopic("client id must not be empty")
        if max_packet_size < 64:
            raise InvalidTopic(f"max_packet_size {max_packet_size} is too small")
        self.client_id = client_id
        self.will = will
        self._max_packet_size = max_packet_size
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._subscriptions: dict[str, int] = {}  # filter -> qos, made again on every connect
        self._confirmed: set[str] = set()  # filters the broker holds in the current session
        self._unsubscribed: set[str] = set()  # filters it holds that were dropped while offline
        self._sub_lock = threading.Lock()

    # -- network side -------------------------------------------------------------------------

    @abstractmethod
    def connect(self, timeout: float = 10.0) -> bool:
        """Start the connection; True once connected within ``timeout``, False if still trying
        (it keeps trying in the background). Raises :class:`ConnectRefused` on bad credentials."""

    @abstractmethod
    def disconnect(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop reconnecting."""

    @abstractmethod
    def kill(self) -> None:
        """Drop the connection without a DISCONNECT packet, as a crash or a cut cable would: the
        broker publishes the will. The client is finished; its unsent messages are lost."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @property
    def connections(self) -> int:
        """How many times this client has connected: more than one means its connection was lost
        (or its session taken over by another client) and made again."""
        raise NotImplementedError

    @abstractmethod
    def _send_subscribe(self, topic_filter: str, qos: int, timeout: float) -> None:
        """Subscribe now on the live connection; raise SubscribeRefused or NotConnected."""

    @abstractmethod
    def _send_unsubscribe(self, topic_filter: str) -> None: ...

    @abstractmethod
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishHandle: ...

    @abstractmethod
    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message to the broker (no-op for QoS 0 and for a message received
        on an earlier connection: the broker sends that one again)."""

    @property
    def reconnects(self) -> int | None:
        """Connections made after the first: each one followed a lost link or a takeover (None
        for a client that does not count its connections)."""
        try:
            return max(0, self.connections - 1)
        except NotImplementedError:
            return None

    @property
    def last_rtt_s(self) -> float | None:
        """Seconds from the last acknowledged QoS 1 PUBLISH to its PUBACK on one live connection
        (it includes the time the message took to cross: a round trip of a small message, the
        upload of a large one); None when not measured."""
        return None

    @property
    @abstractmethod
    def bytes_sent(self) -> int:
        """Bytes of PUBLISH packets this client has delivered to the broker."""

    @property
    @abstractmethod
    def bytes_received(self) -> int:
        """Bytes of PUBLISH packets this client has received."""

    # -- shared behaviour ---------------------------------------------------------------------

    @property
    def max_packet_size(self) -> int:
        return self._max_packet_size

    @property
    def subscriptions(self) -> dict[str, int]:
        with self._sub_lock:
            return dict(self._subscriptions)

    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout: float = 10.0) -> None:
        """Subscribe now if connected (raising :class:`SubscribeRefused` if the broker says no),
        and again after every reconnect."""
        check_filter(topic_filter)
        if qos not in QOS_LEVELS:
            raise InvalidTopic(f"subscribe to {topic_filter!r}: qos {qos} is not 0 or 1")
        with self._sub_lock:
            self._subscriptions[topic_filter] = qos
            self._confirmed.discard(topic_filter)  # sent again, even in a kept session: its retained copy is asked for
            self._unsubscribed.discard(topic_filter)
        try:
            self._send_subscribe(topic_filter, qos, timeout)
        except NotConnected:
            return  # made on the next connect
        except SubscribeRefused:
            with self._sub_lock:
                self._subscriptions.pop(topic_filter, None)
            raise
        self._confirm(topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._sub_lock:
            self._subscriptions.pop(topic_filter, None)
            held = topic_filter in self._confirmed
            self._confirmed.discard(topic_filter)
        try:
            self._send_unsubscribe(topic_filter)
        except NotConnected:
            if held:
                with self._sub_lock:
                    self._unsubscribed.add(topic_filter)  # dropped on the next connect to this session
            return

    def _confirm(self, topic_filter: str) -> None:
        """The broker granted ``topic_filter`` on the current connection (for implementations)."""
        with self._sub_lock:
            if topic_filter in self._subscriptions:
                self._confirmed.add(topic_filter)

    def _resubscriptions(self, *, session_present: bool) -> tuple[dict[str, int], list[str]]:
        """On a new connection: (filters to subscribe, filters to unsubscribe). A new session
        holds nothing: every filter, nothing to drop. A kept session holds what the broker
        confirmed before: only the others, and the filters dropped while offline."""
        with self._sub_lock:
            if not session_present:
                self._confirmed.clear()
                self._unsubscribed.clear()
                return dict(self._subscriptions), []
            drop, self._unsubscribed = sorted(self._unsubscribed), set()
            return {f: q for f, q in self._subscriptions.items() if f not in self._confirmed}, drop

    def receive(self, timeout: float = 0.0) -> Message | None:
        """The next received message, waiting up to ``timeout`` seconds; None if none came."""
        try:
            if timeout <= 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _hand_over(self, message: Message) -> None:
        """Called from the network side: never blocks."""
        self._inbox.put_nowait(message)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
