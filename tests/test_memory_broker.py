"""Behaviour of the in-memory broker that the shared contract tests do not reach."""

import pytest

from fednca.topics import COORDINATOR, SITE, Topics
from fednca.transport import (
    ConnectRefused,
    InvalidTopic,
    NotConnected,
    PayloadTooLarge,
    PublishRefused,
    SubscribeRefused,
    TransportError,
    Will,
)
from fednca.transport.base import publish_packet_size
from fednca.transport.memory import MemoryBroker

T = Topics("fed")


def drain(client):
    out = []
    while (m := client.receive()) is not None:
        out.append(m)
    return out


def pair(broker, **sub_kwargs):
    pub = broker.client(client_id="pub")
    sub = broker.client(client_id="sub", **sub_kwargs)
    pub.connect()
    sub.connect()
    return pub, sub


def test_offline_queue_is_bounded_and_counts_drops():
    broker = MemoryBroker(max_queued_messages=3)
    pub, sub = pair(broker)
    sub.subscribe("t")
    sub.disconnect()
    for i in range(5):
        pub.publish("t", b"%d" % i).result(1)
    assert broker.queued("sub") == 3 and broker.dropped("sub") == 2
    sub.connect()
    assert [m.payload for m in drain(sub)] == [b"0", b"1", b"2"]


def test_qos0_for_an_offline_client_is_dropped():
    broker = MemoryBroker()
    pub, sub = pair(broker)
    sub.subscribe("t", qos=0)
    sub.disconnect()
    pub.publish("t", b"x", qos=0)
    sub.connect()
    assert drain(sub) == []


def test_inflight_window_holds_back_until_acked():
    broker = MemoryBroker(max_inflight_messages=2)
    pub, sub = pair(broker)
    sub.subscribe("t")
    for i in range(4):
        pub.publish("t", b"%d" % i)
    first = drain(sub)
    assert [m.payload for m in first] == [b"0", b"1"]
    assert broker.queued("sub") == 2
    sub.ack(first[0])
    assert [m.payload for m in drain(sub)] == [b"2"]


def test_duplicate_deliveries_are_flagged_and_one_ack_suffices():
    broker = MemoryBroker(duplicate_probability=1.0, max_inflight_messages=1)
    pub, sub = pair(broker)
    sub.subscribe("t")
    pub.publish("t", b"a")
    pub.publish("t", b"b")
    got = drain(sub)
    assert [(m.payload, m.dup) for m in got] == [(b"a", False), (b"a", True)]
    sub.ack(got[1])
    sub.ack(got[0])  # a second ack of the same message changes nothing
    assert [m.payload for m in drain(sub)] == [b"b", b"b"]


def test_duplicates_are_reproducible_by_seed():
    def pattern(seed):
        broker = MemoryBroker(duplicate_probability=0.5, seed=seed)
        pub, sub = pair(broker)
        sub.subscribe("t")
        for i in range(20):
            pub.publish("t", b"%d" % i)
        return [m.dup for m in drain(sub)]

    assert pattern(1) == pattern(1)
    assert any(pattern(1)) and not all(pattern(1))


def test_ack_from_an_earlier_connection_is_ignored_and_message_comes_again():
    broker = MemoryBroker()
    pub, sub = pair(broker)
    sub.subscribe("t")
    pub.publish("t", b"x")
    old = sub.receive()
    broker.drop("sub")  # cut, and reconnected at once
    assert [(m.payload, m.dup) for m in drain(sub)] == [(b"x", True)]
    sub.ack(old)  # received on the earlier connection: ignored
    broker.drop("sub")
    again = drain(sub)
    assert [(m.payload, m.dup) for m in again] == [(b"x", True)]
    sub.ack(again[0])
    broker.drop("sub")
    assert drain(sub) == []


def test_clean_start_session_ends_with_its_connection():
    broker = MemoryBroker()
    pub, sub = pair(broker, clean_start=True)
    sub.subscribe("t")
    sub.disconnect()
    pub.publish("t", b"x")
    assert broker.queued("sub") == 0
    sub.connect()
    assert sub.subscriptions == {"t": 1}  # the client subscribes again by itself
    pub.publish("t", b"y")
    assert [m.payload for m in drain(sub)] == [b"y"]


def test_takeover_cuts_the_old_connection_and_sends_its_will():
    broker = MemoryBroker()
    watcher = broker.client(client_id="w")
    watcher.connect()
    watcher.subscribe("will")
    old = broker.client(client_id="dev", will=Will("will", b"gone", retain=False))
    old.connect()
    new = broker.client(client_id="dev")
    new.connect()
    assert new.connected and not old.connected
    assert watcher.receive().payload == b"gone"


def test_traffic_counts_publish_packets_both_ways():
    broker = MemoryBroker()
    pub, sub = pair(broker)
    sub.subscribe("t")
    pub.publish("t", b"12345").result(1)
    size = publish_packet_size("t", 5, 1)
    assert broker.traffic("pub").bytes_in == size == pub.bytes_sent
    assert sub.bytes_received == size and sub.bytes_sent == 0


def test_client_limit_follows_the_broker_maximum():
    broker = MemoryBroker(max_packet_size=200)
    client = broker.client(client_id="c", max_packet_size=10_000)
    client.publish("t", b"x" * 500)  # offline: only its own limit is known
    client.connect()
    assert client.max_packet_size == 200
    with pytest.raises(PayloadTooLarge) as err:
        client.publish("t", b"x" * 500)
    assert err.value.topic == "t" and err.value.payload_size == 500 and err.value.limit == 200


def test_message_queued_offline_over_the_broker_maximum_is_refused_on_connect():
    broker = MemoryBroker(max_packet_size=200)
    client = broker.client(client_id="c", max_packet_size=10_000)
    handle = client.publish("t", b"x" * 500)
    client.connect()
    with pytest.raises(PublishRefused):
        handle.result(0)
    assert client.connected


def test_qos0_publish_while_offline_raises():
    client = MemoryBroker().client(client_id="c")
    with pytest.raises(NotConnected, match="'t'"):
        client.publish("t", b"x", qos=0)


def test_publish_to_a_wildcard_is_refused():
    client = MemoryBroker().client(client_id="c")
    with pytest.raises(InvalidTopic):
        client.publish("a/+", b"x")
    with pytest.raises(InvalidTopic):
        client.subscribe("a/#/b")


def test_stopped_broker_refuses_connections_until_started():
    broker = MemoryBroker()
    broker.stop()
    client = broker.client(client_id="c")
    assert client.connect() is False
    handle = client.publish("t", b"x")
    broker.start()
    assert client.connected and handle.accepted


def test_bad_password_is_refused():
    broker = MemoryBroker(federation="fed")
    broker.add_user("s1", password="right", role=SITE)
    with pytest.raises(ConnectRefused, match="password"):
        broker.client(client_id="s1", username="s1", password="wrong").connect()
    with pytest.raises(ConnectRefused):
        broker.client(client_id="anon").connect()


def test_denied_subscribe_is_refused_and_forgotten():
    broker = MemoryBroker(federation="fed")
    broker.add_user("s1", password="p", role=SITE)
    client = broker.client(client_id="s1", username="s1", password="p")
    client.connect()
    with pytest.raises(SubscribeRefused, match="receipts"):
        client.subscribe(T.receipts("s2"))
    assert client.subscriptions == {}


def test_denied_will_is_not_published():
    broker = MemoryBroker(federation="fed")
    broker.add_user("s1", password="p", role=SITE)
    broker.add_user("coord", password="c", role=COORDINATOR)
    coord = broker.client(client_id="coord", username="coord", password="c")
    coord.connect()
    coord.subscribe(T.all_status)
    liar = broker.client(
        client_id="s1", username="s1", password="p", will=Will(T.status("s2"), b"offline")
    )
    liar.connect()
    liar.kill()
    assert coord.receive() is None and broker.retained(T.status("s2")) is None


def test_users_need_a_federation_and_a_known_role():
    with pytest.raises(TransportError, match="federation"):
        MemoryBroker().add_user("s1", password="p", role=SITE)
    with pytest.raises(TransportError, match="role"):
        MemoryBroker(federation="fed").add_user("s1", password="p", role="admin")


def test_session_keeps_order_window_and_unique_packet_ids_without_a_broker():
    from fednca.transport.memory_session import MAX_MID, Pending, Session

    session = Session("c", None, None, clean=False)
    messages = [Pending(f"t/{i}", b"x", 1) for i in range(4)]
    assert [session.enqueue(m, limit=3) for m in messages] == [True, True, True, False]
    assert session.dropped == 1
    assert list(session.release(window=2)) == [], "nothing goes in flight while the client is offline"
    session.client = object()  # type: ignore[assignment]
    session.next_mid = MAX_MID
    released = list(session.release(window=2))
    assert released == [(MAX_MID, messages[0]), (1, messages[1])], "ids wrap from 65535 to 1, in order"
    assert list(session.release(window=2)) == [] and len(session.queue) == 1
    assert session.settle(1) and not session.settle(1), "a second ack of the same id frees nothing"
    session.next_mid = MAX_MID  # the id still in flight is skipped
    assert list(session.release(window=2)) == [(1, messages[2])]
