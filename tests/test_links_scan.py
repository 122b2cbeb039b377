"""The link emulator acts at a moment of an MQTT packet: the pure scanner of packet headers, and a
trigger that fires once part of a PUBLISH on a topic has reached the far end."""

from __future__ import annotations

import socket
import threading

from e2e_support import wait_until
from fednca_app.harness.link_proxy import Link
from fednca_app.harness.links import Profile
from fednca_app.harness.mqtt_scan import PUBLISH, PacketScanner, PacketStart


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, *, mid: int = 1) -> bytes:
    """An MQTT 5 QoS 1 PUBLISH without properties, byte for byte."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + mid.to_bytes(2, "big") + b"\x00" + payload
    return b"\x32" + varint(len(body)) + body


PINGREQ = b"\xc0\x00"
CONNECT = b"\x10\x0a" + b"\x00\x04MQTT\x05\x02\x00\x1e"  # 12 bytes: a CONNECT's fixed and variable header


def test_packets_are_found_whatever_the_chunks():
    stream = CONNECT + publish("fednca/f/status/a", b"x" * 40) + PINGREQ + publish("fednca/f/updates/a", b"u" * 300)
    expected = [PacketStart(kind=1, offset=0, length=12),
                PacketStart(kind=PUBLISH, offset=12, length=2 + 2 + 17 + 3 + 40, topic="fednca/f/status/a"),
                PacketStart(kind=12, offset=76, length=2),
                PacketStart(kind=PUBLISH, offset=78, length=3 + 2 + 18 + 3 + 300, topic="fednca/f/updates/a")]
    assert PacketScanner().feed(stream) == expected
    for size in (1, 2, 7, 64):
        scanner = PacketScanner()
        found = [p for i in range(0, len(stream), size) for p in scanner.feed(stream[i:i + size])]
        assert found == expected, size


def test_a_stream_that_is_not_mqtt_gives_no_error():
    scanner = PacketScanner()
    for junk in (b"\xff" * 9, b"\x30\x01", bytes(range(256)) * 4, b"\x30\x05\x00\xff\xff"):
        assert isinstance(scanner.feed(junk), list)


def test_a_trigger_fires_once_when_part_of_the_publish_has_crossed(tmp_path):
    kept = bytearray()
    server = socket.create_server(("127.0.0.1", 0))

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                kept.extend(data)

    threading.Thread(target=sink, daemon=True).start()
    at_fire: list[int] = []
    link = Link(profile=Profile(), target_port=server.getsockname()[1])
    try:
        trigger = link.on_publish("fednca/f/updates/a", after_bytes=4000,
                                  action=lambda: at_fire.append(link.stats.up_bytes))
        other = publish("fednca/f/status/a", b"s" * 5000)  # another topic: no trigger
        update = publish("fednca/f/updates/a", b"u" * 16_000)
        with socket.create_connection(("127.0.0.1", link.port), timeout=5) as party:
            party.sendall(other + update + update)  # the second copy fires nothing more
            wait_until(lambda: len(kept) == len(other) + 2 * len(update), timeout=10, what="every byte delivered")
        assert trigger.fired.is_set() and len(at_fire) == 1
        assert link.publishes == {("up", "fednca/f/status/a"): 1, ("up", "fednca/f/updates/a"): 2}
        # it fired once 4000 bytes of the first update had been written to the sink (in the chunk that crossed)
        assert len(other) + 4000 <= at_fire[0] < len(other) + 4000 + 1024, at_fire
    finally:
        link.close()
        server.close()
