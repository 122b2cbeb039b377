"""One contract, two implementations: the in-memory broker and paho against a real mosquitto.

Every test runs on both. Where a test must show that something did NOT arrive, a later message
that must arrive is used as a marker (one broker delivers to a client in order), so no test waits
for a timeout to pass. Every wait is bounded.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from fednca import topics
from fednca.topics import Topics
from fednca.transport import (
    Client,
    ConnectRefused,
    PayloadTooLarge,
    SubscribeRefused,
    Will,
)
from fednca.transport.base import NOT_AUTHORIZED
from fednca.transport.memory import MemoryBroker
from fednca.transport.mqtt import MqttClient, TransportError, parse_url

FED = "fed"
SITES = ("site-a", "site-b")
T = Topics(FED)
WAIT = 5.0


def role_of(user: str) -> str:
    return topics.COORDINATOR if user == "coordinator" else topics.SITE


class MemoryHarness:
    def __init__(self) -> None:
        self.broker = MemoryBroker(federation=FED)
        for user in ("coordinator", *SITES):
            self.broker.add_user(user, password=f"{user}-secret", role=role_of(user))

    def make(self, user: str, client_id: str, password: str | None = None, **kwargs) -> Client:
        return self.broker.client(
            client_id=client_id, username=user, password=password or f"{user}-secret", **kwargs
        )

    def stop(self) -> None:
        self.broker.stop()

    def start(self) -> None:
        self.broker.start()


class MosquittoHarness:
    def __init__(self, mosquitto) -> None:
        self.mosquitto = mosquitto

    def make(self, user: str, client_id: str, password: str | None = None, **kwargs) -> Client:
        return MqttClient(
            url=self.mosquitto.url,
            client_id=client_id,
            username=user,
            password=password or self.mosquitto.passwords[user],
            reconnect_min_delay=0.05,
            reconnect_max_delay=0.2,
            **kwargs,
        )

    def stop(self) -> None:
        self.mosquitto.stop()

    def start(self) -> None:
        self.mosquitto.start()


@pytest.fixture(params=["memory", "mosquitto"])
def broker(request):
    if request.param == "memory":
        harness = MemoryHarness()
    else:
        harness = MosquittoHarness(request.getfixturevalue("mosquitto"))
    made: list[Client] = []

    def connect(user: str, *, client_id: str | None = None, **kwargs) -> Client:
        client = harness.make(user, client_id or user, **kwargs)
        made.append(client)
        assert client.connect(WAIT), f"{user} did not connect"
        return client

    harness.connect = connect
    yield harness
    for client in made:
        client.disconnect()


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def next_message(client: Client):
    message = client.receive(WAIT)
    assert message is not None, f"{client.client_id} received nothing within {WAIT} s"
    client.ack(message)
    return message


def subscribe_maybe_refused(client: Client, topic_filter: str) -> None:
    """A broker may refuse a subscription its ACL denies (memory) or grant it and withhold every
    message (mosquitto 2.0's ACL file): the tests accept either and check what arrives."""
    try:
        client.subscribe(topic_filter)
    except SubscribeRefused:
        return


def test_publish_subscribe_with_wildcards(broker):
    coordinator = broker.connect("coordinator")
    coordinator.subscribe(T.all_updates)
    site_a, site_b = broker.connect("site-a"), broker.connect("site-b")
    site_a.publish(T.updates("site-a"), b"from a").result(WAIT)
    site_b.publish(T.updates("site-b"), b"from b").result(WAIT)
    got = [next_message(coordinator) for _ in range(2)]
    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
        (T.updates("site-a"), b"from a", 1, False),
        (T.updates("site-b"), b"from b", 1, False),
    ]
    assert site_a.bytes_sent > len(b"from a") and coordinator.bytes_received >= site_a.bytes_sent


def test_retained_message_reaches_late_subscribers_until_cleared(broker):
    coordinator = broker.connect("coordinator")
    coordinator.publish(T.round, b"round 1", retain=True).result(WAIT)
    site_a = broker.connect("site-a")
    site_a.subscribe(T.round)
    first = next_message(site_a)
    assert (first.payload, first.retain) == (b"round 1", True)

    coordinator.publish(T.round, b"", retain=True).result(WAIT)  # clears it
    assert next_message(site_a).payload == b""  # live subscribers see the empty message
    site_b = broker.connect("site-b")
    site_b.subscribe(T.round)
    site_b.subscribe(T.receipts("site-b"))
    coordinator.publish(T.receipts("site-b"), b"marker").result(WAIT)
    assert next_message(site_b).payload == b"marker"  # no retained round came first


def test_qos1_messages_wait_for_an_offline_persistent_session(broker):
    coordinator = broker.connect("coordinator")
    coordinator.subscribe(T.all_updates)
    coordinator.disconnect()
    site_a = broker.connect("site-a")
    for i in range(3):
        site_a.publish(T.updates("site-a"), b"u%d" % i).result(WAIT)
    back = broker.connect("coordinator")  # a new process; the broker kept the session
    assert [next_message(back).payload for _ in range(3)] == [b"u0", b"u1", b"u2"]


def test_unacked_message_comes_again_after_a_crash(broker):
    coordinator = broker.connect("coordinator")
    coordinator.subscribe(T.all_updates)
    site_a = broker.connect("site-a")
    site_a.publish(T.updates("site-a"), b"precious").result(WAIT)
    first = coordinator.receive(WAIT)
    assert first is not None and first.payload == b"precious"
    coordinator.kill()  # died before storing it, so it never acked
    back = broker.connect("coordinator")
    again = next_message(back)
    assert (again.payload, again.dup) == (b"precious", True)


def test_last_will_on_crash_but_not_on_clean_disconnect(broker):
    coordinator = broker.connect("coordinator")
    coordinator.subscribe(T.all_status)
    site_a = broker.connect("site-a", will=Will(T.status("site-a"), b"offline"))
    site_b = broker.connect("site-b", will=Will(T.status("site-b"), b"offline"))
    site_b.disconnect()
    site_a.kill()
    will = next_message(coordinator)
    assert (will.topic, will.payload) == (T.status("site-a"), b"offline")  # not site-b's
    late = broker.connect("coordinator", client_id="observer")
    late.subscribe(T.all_status)
    held = next_message(late)
    assert (held.topic, held.payload, held.retain) == (T.status("site-a"), b"offline", True)


def test_acl_refuses_a_site_writing_another_sites_updates(broker):
    coordinator = broker.connect("coordinator")
    coordinator.subscribe(T.all_updates)
    site_a = broker.connect("site-a")
    forged = site_a.publish(T.updates("site-b"), b"forged")
    assert forged.wait(WAIT) and forged.reason_code == NOT_AUTHORIZED and not forged.accepted
    site_a.publish(T.updates("site-a"), b"honest").result(WAIT)
    assert next_message(coordinator).payload == b"honest"


def test_acl_keeps_other_sites_receipts_and_updates_from_a_site(broker):
    coordinator = broker.connect("coordinator")
    site_a, site_b = broker.connect("site-a"), broker.connect("site-b")
    for topic_filter in (T.receipts("site-b"), T.updates("site-b"), "fednca/fed/receipts/+"):
        subscribe_maybe_refused(site_a, topic_filter)
    site_a.subscribe(T.receipts("site-a"))
    coordinator.publish(T.receipts("site-b"), b"for b").result(WAIT)
    site_b.publish(T.updates("site-b"), b"b's update").result(WAIT)
    coordinator.publish(T.receipts("site-a"), b"for a").result(WAIT)
    assert next_message(site_a).payload == b"for a"


def test_oversized_payload_is_refused_before_sending(broker):
    site_a = broker.connect("site-a", max_packet_size=4 * 1_048_576)
    assert site_a.max_packet_size == 1_048_576  # lowered to the broker's maximum
    sent = site_a.bytes_sent
    with pytest.raises(PayloadTooLarge) as err:
        site_a.publish(T.updates("site-a"), bytes(1_048_576))
    assert err.value.topic == T.updates("site-a") and err.value.limit == 1_048_576
    assert T.updates("site-a") in str(err.value) and "1048576" in str(err.value)
    assert site_a.bytes_sent == sent and site_a.connected
    site_a.publish(T.updates("site-a"), bytes(1000)).result(WAIT)


def test_subscriptions_are_made_again_after_a_reconnect(broker):
    # clean_start: the broker forgets everything, so only a new SUBSCRIBE brings messages.
    coordinator = broker.connect("coordinator", clean_start=True)
    coordinator.subscribe(T.all_updates)
    site_a = broker.connect("site-a")
    broker.stop()
    broker.start()
    wait_until(lambda: coordinator.connected and site_a.connected, "both to reconnect")
    wait_until(lambda: T.all_updates in coordinator.subscriptions, "the subscription")
    handle = site_a.publish(T.updates("site-a"), b"after restart")
    handle.result(WAIT)
    assert next_message(coordinator).payload == b"after restart"


def test_a_reconnect_to_a_kept_session_does_not_bring_a_retained_message_twice(broker):
    # A whole model is retained on ``round``: after a reconnect, a site whose session the broker kept
    # gets only what was queued for it, while a new session subscribes again and gets the retained copy.
    coordinator = broker.connect("coordinator")
    coordinator.publish(T.round, b"model 1", retain=True).result(WAIT)
    kept = broker.connect("site-a")
    kept.subscribe(T.round)
    assert next_message(kept).payload == b"model 1"
    fresh = broker.connect("site-b", clean_start=True)
    fresh.subscribe(T.round)
    assert next_message(fresh).payload == b"model 1"
    broker.stop()
    broker.start()
    wait_until(lambda: kept.connected and fresh.connected and coordinator.connected, "all three to reconnect")
    assert (kept.reconnects, fresh.reconnects) == (1, 1)
    again = next_message(fresh)  # the new session subscribed again: the retained copy comes
    assert (again.payload, again.retain) == (b"model 1", True)
    coordinator.publish(T.round, b"marker").result(WAIT)
    assert next_message(kept).payload == b"marker"  # no second copy of the model came first
    assert next_message(fresh).payload == b"marker"


def test_a_subscription_asked_for_while_offline_brings_the_retained_message(broker):
    coordinator = broker.connect("coordinator")
    coordinator.publish(T.round, b"model 1", retain=True).result(WAIT)
    site_a = broker.connect("site-a")
    site_a.subscribe(T.receipts("site-a"))
    broker.stop()
    wait_until(lambda: not site_a.connected, "the connection to drop")
    site_a.subscribe(T.round)  # not confirmed by the broker: made on the reconnect, kept session or not
    broker.start()
    got = next_message(site_a)
    assert (got.payload, got.retain) == (b"model 1", True)
    assert T.round in site_a.subscriptions


def test_the_last_round_trip_of_a_qos1_message_is_measured(broker):
    site_a = broker.connect("site-a")
    site_a.publish(T.updates("site-a"), b"x" * 100).result(WAIT)
    rtt = site_a.last_rtt_s
    assert rtt is not None and 0.0 <= rtt < WAIT
    assert site_a.reconnects == 0


def test_qos1_published_while_the_broker_is_down_goes_out_after(broker):
    coordinator = broker.connect("coordinator")
    coordinator.subscribe(T.all_updates)
    site_a = broker.connect("site-a")
    broker.stop()
    wait_until(lambda: not site_a.connected, "the connection to drop")
    handle = site_a.publish(T.updates("site-a"), b"queued")
    assert not handle.done
    broker.start()
    handle.result(WAIT)
    assert next_message(coordinator).payload == b"queued"


def test_publishes_from_several_threads_all_settle_and_arrive(broker):
    coordinator = broker.connect("coordinator")
    coordinator.subscribe(T.all_updates)
    sites = [broker.connect(site) for site in SITES]
    handles: dict[str, list] = {}

    def burst(client: Client) -> None:
        topic = T.updates(client.client_id)
        handles[client.client_id] = [client.publish(topic, b"%d" % i) for i in range(100)]

    threads = [threading.Thread(target=burst, args=(site,)) for site in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    for handle in [h for hs in handles.values() for h in hs]:
        handle.result(WAIT)
    got: dict[str, list[bytes]] = {T.updates(site): [] for site in SITES}
    for _ in range(200):
        message = next_message(coordinator)
        got[message.topic].append(message.payload)
    assert all(payloads == [b"%d" % i for i in range(100)] for payloads in got.values())


def test_wrong_password_is_refused(broker):
    with pytest.raises(ConnectRefused):
        broker.connect("site-a", client_id="intruder", password="guess")


# -- the ACL table: what each user can write and read equals topics.allowed ----------------

TABLE_TOPICS = [
    T.round, T.events,
    T.updates("site-a"), T.updates("site-b"),
    T.receipts("site-a"), T.receipts("site-b"),
    T.status("site-a"), T.status("site-b"),
]  # fmt: skip
USERS = ("coordinator", *SITES)


def expected(user: str, action: str, topic: str) -> bool:
    return topics.allowed(user=user, role=role_of(user), action=action, topic=topic, federation=FED)


def test_writes_match_the_rule_table(broker):
    clients = {user: broker.connect(user) for user in USERS}
    for user, client in clients.items():
        for topic in [*TABLE_TOPICS, "fednca/other/round", "elsewhere/x"]:
            handle = client.publish(topic, b"w")
            assert handle.wait(WAIT)
            assert handle.accepted is expected(user, "write", topic), (user, topic)


def test_reads_match_the_rule_table(broker):
    clients = {user: broker.connect(user) for user in USERS}
    for client in clients.values():
        for topic in TABLE_TOPICS:
            subscribe_maybe_refused(client, topic)
    writer = {t: next(u for u in USERS if expected(u, "write", t)) for t in TABLE_TOPICS}
    for topic in TABLE_TOPICS:  # each acknowledged before the next: one global order
        clients[writer[topic]].publish(topic, topic.encode()).result(WAIT)
    markers = {"coordinator": T.updates("site-a"), "site-a": T.receipts("site-a"),
               "site-b": T.receipts("site-b")}  # fmt: skip
    for user, marker in markers.items():
        clients[writer[marker]].publish(marker, b"marker").result(WAIT)
    for user, client in clients.items():
        seen = []
        while (message := next_message(client)).payload != b"marker":
            seen.append(message.topic)
        assert seen == [t for t in TABLE_TOPICS if expected(user, "read", t)], user


# -- the paho adapter's own behaviour --------------------------------------------------------


@pytest.mark.parametrize(
    "url, host, port, tls",
    [
        ("mqtt://broker.example", "broker.example", 1883, False),
        ("mqtts://broker.example", "broker.example", 8883, True),
        ("mqtt://127.0.0.1:11883", "127.0.0.1", 11883, False),
        ("mqtts://[::1]:9000/", "::1", 9000, True),
    ],
)
def test_parse_url(url, host, port, tls):
    address = parse_url(url)
    assert (address.host, address.port, address.tls) == (host, port, tls)
    assert parse_url(str(address)) == address


@pytest.mark.parametrize(
    "url",
    ["http://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "mqtt://u:p@h", "h:1883", "mqtt://h:x"],
)
def test_parse_url_refuses(url):
    with pytest.raises(TransportError):
        parse_url(url)


def test_tls_options_need_an_mqtts_address():
    from fednca.transport.mqtt import TLSOptions

    with pytest.raises(TransportError, match="mqtts"):
        MqttClient(url="mqtt://h:1", client_id="c", tls=TLSOptions(ca_file="ca.pem"))


def _fake_v311_broker(server: socket.socket, seen: list[int], stop: threading.Event) -> None:
    """Answers a v5 CONNECT as a 3.1.1-only broker does (return code 1) and accepts 3.1.1."""
    server.settimeout(0.1)
    keep = []
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        packet = conn.recv(1024)
        level = packet[2 + 2 + 4]  # fixed header, name length, "MQTT", then the level
        seen.append(level)
        conn.sendall(bytes([0x20, 0x02, 0x00, 0x00 if level == 4 else 0x01]))
        keep.append(conn)
    for conn in keep:
        conn.close()


def test_falls_back_to_3_1_1_when_the_broker_refuses_v5():
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=_fake_v311_broker, args=(server, seen, stop))
    thread.start()
    client = MqttClient(
        url=f"mqtt://127.0.0.1:{server.getsockname()[1]}", client_id="old", keepalive=60
    )
    try:
        assert client.connect(WAIT)
        assert client.protocol == "3.1.1" and seen == [5, 4]
    finally:
        client.disconnect()
        stop.set()
        thread.join(WAIT)
        server.close()


def test_v311_denied_publish_is_acknowledged_and_dropped(mosquitto):
    def make(user):
        c = MqttClient(url=mosquitto.url, client_id=user, username=user,
                       password=mosquitto.passwords[user], protocol="3.1.1")  # fmt: skip
        assert c.connect(WAIT)
        return c

    coordinator, site_a = make("coordinator"), make("site-a")
    try:
        coordinator.subscribe(T.all_updates)
        site_a.publish(T.updates("site-b"), b"forged").result(WAIT)  # accepted, yet dropped
        site_a.publish(T.updates("site-a"), b"honest").result(WAIT)
        assert next_message(coordinator).payload == b"honest"
    finally:
        coordinator.disconnect()
        site_a.disconnect()
