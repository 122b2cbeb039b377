"""The transport over a real MQTT broker, through paho-mqtt 2.x. This module is the only one in
the project that imports paho; everything else speaks :class:`fednca.transport.base.Client`.

Behaviour (see also :mod:`fednca.transport.base`):

- MQTT v5 first; a broker that answers "unsupported protocol version" gets 3.1.1 instead
  (``protocol="auto"``, the default), once, for the life of the client.
- Persistent session: v5 ``clean_start=False`` with a Session Expiry Interval (7 days by default);
  v3.1.1 ``clean_session=False``. QoS 1 messages for an offline client wait at the broker.
- paho's network thread (``loop_start``) reconnects with exponential back-off; subscriptions are
  made again in ``on_connect``, all of them for a new session, and only those the broker never
  confirmed when it kept the session (so a retained model is not sent a second time beside its
  queued copy). Callbacks only convert and hand over, under a short lock.
- Link counters: PUBLISH bytes each way, reconnects, and the PUBLISH-to-PUBACK time of the last
  QoS 1 message sent and acknowledged on one connection (timed by the injected ``clock``).
- ``manual_ack``: a QoS 1 message is acknowledged when the application calls ``ack``.
- Publish handles follow paho's message ids through ``on_publish``; a QoS 1 message published
  while offline waits in paho's memory and its handle settles after the reconnect.
- The payload size is checked against the configured maximum, lowered to the broker's Maximum
  Packet Size from a v5 CONNACK: paho itself ignores that maximum.
- With v3.1.1 an ACL-denied publish is still acknowledged (the broker drops it silently); v5
  reports reason 135 on the handle.
- Connection state is logged (logger ``fednca.transport``), one line per change with paho's
  reason: connected, reconnected (with whether the broker kept the session), refused, and
  disconnected (asked for, or lost: then paho reconnects with back-off). The shells (coordinator,
  daemon, status) get these lines without knowing paho.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .base import (
    DEFAULT_MAX_PACKET_SIZE,
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

log = logging.getLogger("fednca.transport")

UNSUPPORTED_PROTOCOL = 132
# CONNACK reasons that retrying cannot fix: bad client id, credentials, not authorized, banned,
# bad authentication method.
PERMANENT_REFUSALS = frozenset({133, 134, 135, 138, 140})
_SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` (TLS)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise TransportError(f"broker address {url!r}: the scheme must be mqtt:// or mqtts://")
    default_port, tls = _SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise TransportError(f"broker address {url!r}: the port is not a number from 1 to 65535")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TransportError(f"broker address {url!r}: expected scheme://host:port, nothing more")
    if parts.username or parts.password:
        raise TransportError(f"broker address {url!r}: give credentials separately, not in the URL")
    return BrokerAddress(host=parts.hostname, port=port, tls=tls)


@dataclass(frozen=True)
class TLSOptions:
    ca_file: str | None = None  # None: the system's trusted certificates
    cert_file: str | None = None  # client certificate, when the broker asks for one
    key_file: str | None = None


def tls_context(options: TLSOptions) -> ssl.SSLContext:
    """TLS 1.2 or newer, the server's certificate checked against ``ca_file`` and its name against
    the host in the URL (``ssl.create_default_context`` does both; nothing here turns them off)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.cert_file is not None:
        ctx.load_cert_chain(options.cert_file, options.key_file)
    return ctx


@dataclass
class _SubscribeWait:
    topic_filter: str
    done: threading.Event
    refusal: str | None = None


class MqttClient(Client):
    """A :class:`~fednca.transport.base.Client` over paho-mqtt."""

    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: TLSOptions | None = None,
        will: Will | None = None,
        clean_start: bool = False,
        session_expiry: int = 7 * 24 * 3600,
        keepalive: int = 30,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        reconnect_min_delay: float = 1.0,
        reconnect_max_delay: float = 60.0,
        protocol: str = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client_id=client_id, will=will, max_packet_size=max_packet_size)
        self._clock = clock
        self._sent_at: dict[int, tuple[float, int]] = {}  # mid -> (clock, epoch): QoS 1 sent on a live link
        self._rtt: float | None = None
        self.address = parse_url(url)
        if tls is not None and not self.address.tls:
            raise TransportError(f"TLS options given for {url!r}: use an mqtts:// address")
        if protocol not in ("auto", "5", "3.1.1"):
            raise TransportError(f"protocol {protocol!r} is not auto, 5 or 3.1.1")
        self._username, self._password, self._tls = username, password, tls
        self.clean_start = clean_start
        self._session_expiry = 0 if clean_start else session_expiry
        self._keepalive = keepalive
        self._configured_max = max_packet_size
        self._reconnect_delays = (reconnect_min_delay, reconnect_max_delay)
        self._may_fall_back = protocol == "auto"
        self._protocol = paho.MQTTv311 if protocol == "3.1.1" else paho.MQTTv5
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: dict[int, tuple[PublishHandle, int, tuple[str, bytes, int, bool]]] = {}
        self._early: dict[int, int] = {}  # mid -> reason, when on_publish beat the registration
        self._sub_waits: dict[int, _SubscribeWait] = {}
        self._sub_early: dict[int, str | None] = {}  # mid -> refusal, answer before registration
        self._connected = False
        self._started = False
        self._dead = False
        self._refusal: str | None = None
        self._epoch = 0
        self._sent = self._received = 0
        self.session_present = False
        self.last_error: TransportError | None = None
        self._paho = self._make_paho()

    # -- set-up -------------------------------------------------------------------------------

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    def _make_paho(self) -> paho.Client:
        v5 = self._protocol == paho.MQTTv5
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self._protocol,
            clean_session=None if v5 else self.clean_start,
            manual_ack=True,
        )
        if self._username is not None:
            c.username_pw_set(self._username, self._password)
        if self.address.tls:
            c.tls_set_context(tls_context(self._tls or TLSOptions()))
        if self.will is not None:
            w = self.will
            c.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        c.reconnect_delay_set(*self._reconnect_delays)  # type: ignore[arg-type]
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    def _start(self) -> None:
        props = None
        clean: Any = self.clean_start
        if self._protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry
        else:
            clean = paho.MQTT_CLEAN_START_FIRST_ONLY  # ignored by paho for 3.1.1
        self._paho.connect_async(
            self.address.host,
            self.address.port,
            self._keepalive,
            clean_start=clean,
            properties=props,
        )
        self._paho.loop_start()

    # -- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connections(self) -> int:
        return self._epoch

    def connect(self, timeout: float = 10.0) -> bool:
        with self._lock:
            if self._dead:
                raise NotConnected(f"client {self.client_id!r} was killed")
            start, self._started = not self._started, True
            self._refusal = None
        if start:
            self._start()
        with self._changed:
            self._changed.wait_for(lambda: self._connected or self._refusal is not None, timeout)
            refusal, connected = self._refusal, self._connected
        if refusal is not None and not connected:
            self._stop()
            raise ConnectRefused(str(self.address), refusal)
        return connected

    def _stop(self) -> None:
        with self._lock:
            self._started = False
            self._connected = False
        self._paho.disconnect()
        self._paho.loop_stop()

    def disconnect(self) -> None:
        if self._started:
            self._stop()

    def kill(self) -> None:
        with self._lock:
            self._dead = True
            self._started = False
            self._connected = False
            self._pending.clear()
        sock = self._paho.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT packet: the broker sends the will
            except OSError as e:
                self.last_error = TransportError(f"closing the socket: {e}")
        # Stops the network thread before its reconnect delay runs out, so it never comes back.
        self._paho.loop_stop()
        if sock is not None:
            sock.close()

    def _fall_back(self) -> None:
        """Runs in its own thread: replace the v5 client by a 3.1.1 one (never in a callback)."""
        old = self._paho
        old.loop_stop()
        old.disconnect()
        with self._lock:
            if self._dead or not self._started:
                return
            self._protocol = paho.MQTTv311
            self._paho = self._make_paho()
            unsent = list(self._pending.values())
            self._pending.clear()
        self._start()
        for handle, _, (topic, payload, qos, retain) in unsent:
            self._track(handle, topic, payload, qos, retain)

    # -- paho callbacks (network thread: convert, hand over, never block) -----------------------

    def _on_connect(
        self, client: paho.Client, _u: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if client is not self._paho:
            return
        if reason.is_failure:
            code = int(reason.value)
            if code == UNSUPPORTED_PROTOCOL and self._may_fall_back and self.protocol == "5":
                self._may_fall_back = False
                threading.Thread(target=self._fall_back, name="mqtt-fallback", daemon=True).start()
                return
            error = TransportError(f"broker {self.address} refused the connection: {reason}")
            log.warning("%s: broker %s refused the connection: %s (code %d)", self.client_id, self.address,
                        reason, code)
            with self._changed:
                self.last_error = error
                if code in PERMANENT_REFUSALS:
                    self._refusal = str(reason)
                self._changed.notify_all()
            return
        limit = getattr(props, "MaximumPacketSize", None) if props is not None else None
        with self._changed:
            self._epoch += 1
            self._connected = True
            self.session_present = bool(flags.session_present)
            self._max_packet_size = min(self._configured_max, limit or self._configured_max)
            epoch = self._epoch
            self._changed.notify_all()
        log.info("%s: %s to broker %s (MQTT %s, session %s)", self.client_id,
                 "connected" if epoch == 1 else "reconnected", self.address, self.protocol,
                 "kept" if flags.session_present else "new")
        subscriptions, dropped = self._resubscriptions(session_present=bool(flags.session_present))
        for topic_filter in dropped:
            client.unsubscribe(topic_filter)
        for topic_filter, qos in subscriptions.items():
            _, mid = client.subscribe(topic_filter, qos)
            if mid is not None:
                with self._lock:
                    # A subscribe() still waiting for its answer on the lost connection waits for
                    # this one instead: the broker never answers the old message id now.
                    old = next((m for m, w in self._sub_waits.items() if w.topic_filter == topic_filter), None)
                    wait = self._sub_waits.pop(old) if old is not None else None
                    self._sub_waits[mid] = wait or _SubscribeWait(topic_filter, threading.Event())

    def _on_disconnect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if client is self._paho:
            with self._lock:
                was, self._connected = self._connected, False
                asked = not self._started or self._dead
            if asked:
                log.info("%s: disconnected from broker %s (%s)", self.client_id, self.address, reason)
            elif was:
                log.warning("%s: lost the broker %s: %s (code %s); reconnecting", self.client_id, self.address,
                            reason, getattr(reason, "value", reason))

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            epoch = self._epoch
            self._received += publish_packet_size(msg.topic, len(msg.payload), msg.qos)
        self._hand_over(
            Message(
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                retain=bool(msg.retain),
                dup=bool(msg.dup),
                ack_token=(client, epoch, msg.mid),
            )
        )

    def _on_publish(self, client: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        code = int(reason.value) if reason is not None else 0
        with self._lock:
            entry = self._pending.pop(mid, None) if client is self._paho else None
            sent = self._sent_at.pop(mid, None) if client is self._paho else None
            if sent is not None and sent[1] == self._epoch and code < 128:
                self._rtt = max(0.0, self._clock() - sent[0])
            if entry is None:
                if client is self._paho:
                    self._early[mid] = code
                return
            handle, size, _ = entry
            self._sent += size
        handle.settle(code)

    def _on_subscribe(self, client: paho.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        with self._lock:
            wait = self._sub_waits.pop(mid, None)
            if wait is None:
                self._sub_early[mid] = refused[0] if refused else None
                return
        if refused:
            wait.refusal = refused[0]
            with self._sub_lock:
                self._subscriptions.pop(wait.topic_filter, None)
            self.last_error = SubscribeRefused(wait.topic_filter, wait.refusal)
        else:
            self._confirm(wait.topic_filter)
        wait.done.set()

    # -- operations ---------------------------------------------------------------------------

    def _send_subscribe(self, topic_filter: str, qos: int, timeout: float) -> None:
        if not self._connected:
            raise NotConnected(f"client {self.client_id!r} is not connected")
        wait = _SubscribeWait(topic_filter, threading.Event())
        rc, mid = self._paho.subscribe(topic_filter, qos)  # never called under our lock
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"client {self.client_id!r}: subscribe {topic_filter!r} not sent")
        with self._lock:
            if mid in self._sub_early:  # the answer came before we got here
                wait.refusal = self._sub_early.pop(mid)
                wait.done.set()
            else:
                self._sub_waits[mid] = wait
        if not wait.done.wait(timeout):
            with self._lock:  # nobody waits any more: a late answer is kept as an early one
                if self._sub_waits.get(mid) is wait:
                    del self._sub_waits[mid]
            if not wait.done.is_set():  # the answer may have come while we took the lock
                raise TransportError(f"no answer to the subscription {topic_filter!r} in {timeout} s")
        if wait.refusal is not None:
            raise SubscribeRefused(topic_filter, wait.refusal)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        rc, _ = self._paho.unsubscribe(topic_filter)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnected(f"client {self.client_id!r}: unsubscribe {topic_filter!r} not sent")

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        check_publish(topic, payload, qos, self.max_packet_size)
        if self._dead:
            raise NotConnected(f"client {self.client_id!r} was killed: {topic!r} not sent")
        if qos == 0 and not self._connected:
            raise NotConnected(f"client {self.client_id!r} is not connected: {topic!r} not sent")
        handle = PublishHandle(topic)
        self._track(handle, topic, bytes(payload), qos, retain)
        return handle

    def _track(
        self, handle: PublishHandle, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        with self._lock:
            live, epoch = self._connected, self._epoch
        sent_at = self._clock()
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if qos == 0 and info.rc == paho.MQTT_ERR_NO_CONN:
            raise NotConnected(f"client {self.client_id!r} is not connected: {topic!r} not sent")
        size = publish_packet_size(topic, len(payload), qos)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = (handle, size, (topic, payload, qos, retain))
                if qos and live and info.rc == paho.MQTT_ERR_SUCCESS:
                    self._sent_at[info.mid] = (sent_at, epoch)
            else:
                self._sent += size
        if early is not None:
            handle.settle(early)

    def ack(self, message: Message) -> None:
        if message.qos == 0 or message.ack_token is None:
            return
        client, epoch, mid = message.ack_token  # type: ignore[misc]
        with self._lock:
            current = client is self._paho and epoch == self._epoch and self._connected
        if current:
            # A failed send leaves the message in flight: the broker sends it again.
            self._paho.ack(mid, message.qos)

    @property
    def last_rtt_s(self) -> float | None:
        return self._rtt

    @property
    def bytes_sent(self) -> int:
        return self._sent

    @property
    def bytes_received(self) -> int:
        return self._received
