"""The link emulator: profiles parsed strictly, the pure schedule on a fake clock, the proxy on
loopback with an echo server, and a QoS 1 upload over a 2g link that goes down mid-message."""

from __future__ import annotations

import dataclasses
import random
import socket
import threading
import time

import pytest

from e2e_support import wait_until
from fednca.errors import ConfigError
from fednca.topics import Topics
from fednca.transport.mqtt import MqttClient
from fednca_app.harness.link_proxy import Link, Links
from fednca_app.harness.links import (BUILT_IN, Direction, Lane, Outages, OutagePlan, Profile, cutters, lanes,
                                      load_profile, parse_profile, profile)

# ------------------------------------------------------------------------------------- profiles


def test_a_profile_file_is_read_and_built_in_profiles_are_what_they_say(tmp_path):
    path = tmp_path / "link.yaml"
    path.write_text("name: ward\nup: {kbit_s: 128, latency_ms: 300, jitter_ms: 20}\n"
                    "down: {kbit_s: 512, latency_ms: 300}\n"
                    "outages: {every_s: 60, for_s: 5, windows: [[1, 2.5]], refuse: false}\n"
                    "cuts: {at_byte: 4000, connections: 2}\nseed: 7\n")
    p = load_profile(path)
    assert p.up == Direction(kbit_s=128.0, latency_ms=300.0, jitter_ms=20.0)
    assert p.down.bytes_per_s == 64_000
    assert p.outages == Outages(every_s=60.0, for_s=5.0, windows=((1.0, 2.5),), refuse=False)
    assert (p.cuts.at_byte, p.cuts.connections, p.seed) == (4000, 2, 7)
    g = profile("2g")
    assert (g.up.kbit_s, g.down.kbit_s, g.up.latency_ms + g.down.latency_ms) == (64, 64, 800)
    assert g.outages.every_s and g.outages.for_s
    sat = BUILT_IN["satellite"]
    assert sat.down.kbit_s > sat.up.kbit_s and sat.up.latency_ms + sat.down.latency_ms == 600
    dsl = BUILT_IN["clinic-dsl"]
    assert (dsl.down.kbit_s, dsl.up.kbit_s, dsl.up.latency_ms * 2) == (1000, 256, 40)


def test_a_profile_may_start_from_a_built_in_one():
    p = parse_profile({"base": "2g", "outages": {"every_s": 30, "for_s": 3}, "up": {"jitter_ms": 0}})
    assert p.outages.every_s == 30 and p.outages.for_s == 3
    assert p.up.kbit_s == 64 and p.up.jitter_ms == 0 and p.down.jitter_ms == BUILT_IN["2g"].down.jitter_ms


def test_every_bad_key_of_a_profile_is_named():
    with pytest.raises(ConfigError) as e:
        parse_profile({"up": {"kbit_s": 0, "latency": 3}, "outages": {"every_s": 10, "for_s": 10,
                       "windows": [[5, 2]]}, "cuts": {"per_kb": 2, "direction": "sideways"}, "extra": 1})
    named = {k for k, _ in e.value.problems}
    assert named == {"up.kbit_s", "up.latency", "outages.for_s", "outages.windows[0]", "cuts.per_kb",
                     "cuts.direction", "extra"}, e.value.problems
    with pytest.raises(ConfigError, match="base"):
        parse_profile({"base": "5g"})


# ------------------------------------------------------------------------------ pure schedule


def test_bandwidth_n_bytes_take_n_times_8_over_the_rate():
    lane = Lane(direction=Direction(kbit_s=64, burst_bytes=1024), rng=random.Random(0))
    arrivals = [lane.send(1024, now=0.0) for _ in range(64)]  # 64 KiB handed over at once
    # the first KiB leaves from the full bucket; the other 63 at 8 KB/s
    assert arrivals[-1] == pytest.approx(63 * 1024 * 8 / 64_000, rel=1e-9)
    assert arrivals == sorted(arrivals)
    # a quiet spell refills the bucket (to its depth, no more)
    assert lane.send(1024, now=100.0) == pytest.approx(100.0)
    assert lane.send(1024, now=100.0) == pytest.approx(100.128)


def test_latency_and_seeded_jitter_keep_bytes_in_order():
    d = Direction(latency_ms=400, jitter_ms=100)

    def run(seed: int) -> list[float]:
        lane = Lane(direction=d, rng=random.Random(seed))
        return [lane.send(10, now=t * 0.01) for t in range(200)]

    runs = [run(1), run(1), run(2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]  # seeded: the same seed, the same jitter
    for arrivals in runs:
        assert arrivals == sorted(arrivals)  # TCP order, whatever the jitter
        delays = [a - t * 0.01 for t, a in enumerate(arrivals)]
        assert all(0.3 - 1e-9 <= x <= 0.5 + 1e-9 for x in delays), (min(delays), max(delays))
        assert max(delays) - min(delays) > 0.1  # the jitter is there
    assert lanes(Profile(seed=3))["up"].send(5, now=2.0) == 2.0  # no cap, no latency: at once


def test_periodic_and_explicit_outages_and_outages_added_while_running():
    plan = OutagePlan(outages=Outages(every_s=60, for_s=10, first_s=30, windows=((5, 8), (98, 105))))
    assert [plan.down(t) for t in (0, 5, 7.9, 8, 29.9, 30, 39.9, 40, 90, 99.9)] == \
        [False, True, True, False, False, True, True, False, True, True]
    assert plan.next_window(0) == (5, 8)
    assert plan.next_window(10) == (30, 40)
    assert plan.next_window(95) == (90, 105)  # [90,100) and [98,105) are one outage
    assert plan.next_window(1000) == (1050, 1060)  # 30 + 17 * 60
    plan.add(41, 45)
    assert plan.down(42) and plan.next_window(40.5) == (41, 45)
    plan.add(50, 600)
    plan.end_added(52)  # the added outage under way ends; the profile's windows stay
    assert not plan.down(52) and plan.down(30) and plan.next_window(52) == (90, 105)
    assert OutagePlan(outages=Outages()).next_window(0) is None


def test_cuts_at_a_byte_offset_hit_the_first_connections_and_random_cuts_are_seeded():
    p = Profile(cuts=dataclasses.replace(Profile().cuts, at_byte=2500, connections=1))
    first = cutters(p, connection=0)
    assert first["down"] is None
    assert [first["up"].cut_in(1024) for _ in range(3)] == [None, None, 2500 - 2048]
    assert cutters(p, connection=1)["up"] is None  # the second connection goes through
    q = parse_profile({"cuts": {"per_kb": 0.05, "direction": "both"}, "seed": 4})

    def where(seed_profile: Profile) -> list[int]:
        cutter = cutters(seed_profile, connection=0)["down"]
        return [i for i in range(2000) if cutter.cut_in(1024) is not None]

    cuts = where(q)
    assert cuts == where(q) and 40 <= len(cuts) <= 160  # about 5% of 2000 KiB chunks


# ------------------------------------------------------------------------------ the proxy


class Echo:
    """An echo server on 127.0.0.1 that keeps what each connection sent it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.received: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.received.append(bytearray())
            threading.Thread(target=self._serve, args=(conn, self.received[-1]), daemon=True).start()

    def _serve(self, conn: socket.socket, kept: bytearray) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    kept += data
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


@pytest.fixture
def echo():
    server = Echo()
    yield server
    server.close()


@pytest.fixture
def link_to(echo):
    made: list[Link] = []

    def make(p: Profile, **kw) -> Link:
        made.append(Link(profile=p, target_port=echo.port, **kw))
        return made[-1]

    yield make
    for link in made:
        link.close()


def _echo(port: int, payload: bytes, *, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            try:
                data = s.recv(65536)
            except ConnectionResetError:  # closed by the proxy with our bytes unread
                break
            if not data:
                break
            got += data
        return bytes(got)


def _closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_proxy_caps_bandwidth_in_each_direction(link_to):
    link = link_to(parse_profile({"up": {"kbit_s": 256}}))  # 32 KB/s up, no cap down
    payload = bytes(range(256)) * 96  # 24 KiB: about 0.75 s up
    t0 = time.monotonic()
    assert _echo(link.port, payload) == payload
    took = time.monotonic() - t0
    assert 0.6 < took < 4.0, took  # a floor the cap guarantees; a loose ceiling for a loaded machine
    wait_until(lambda: link.stats.down_bytes == len(payload), timeout=5, what="the count of the last chunk")
    assert link.stats.up_bytes == len(payload)


def test_an_outage_drops_connections_refuses_new_ones_then_the_link_comes_back(link_to):
    link = link_to(Profile())
    s = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    link.outage(600)  # ended by restore() below, however long the checks take on a loaded machine
    assert _closed_by_peer(s)
    s.close()
    assert link.stats.dropped == 1
    assert _echo(link.port, b"hello") == b""  # refused: closed without a byte
    assert link.stats.refused == 1 and link.down()
    link.restore()
    wait_until(lambda: not link.down(), timeout=10, what="the outage to end")
    assert _echo(link.port, b"hello") == b"hello"


class ManualClock:
    """The link's clock, moved by the test: its outage windows do not depend on how fast it runs."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_scheduled_outage_holds_new_connections_when_it_does_not_refuse(link_to, echo):
    clock = ManualClock()
    link = link_to(parse_profile({"outages": {"windows": [[0.0, 0.8]], "refuse": False}}), clock=clock)
    answered: list[tuple[bytes, float]] = []
    party = threading.Thread(target=lambda: answered.append((_echo(link.port, b"held"), clock.t)), daemon=True)
    party.start()
    wait_until(lambda: link.stats.held == 1, timeout=10, what="the connection held")
    assert link.stats.connections == 0 and echo.received == [] and answered == []  # not passed on yet
    clock.t = 1.0  # the window is over
    party.join(15)
    assert answered == [(b"held", 1.0)]  # answered once the window is over
    assert link.stats.held == 1 and link.stats.refused == 0 and link.stats.connections == 1


def test_a_connection_is_cut_in_the_middle_of_a_message(link_to, echo):
    up = link_to(parse_profile({"cuts": {"at_byte": 3000}}))
    echoed = _echo(up.port, b"x" * 8000)  # the echo of the part sent races the cut: any part of it may come back
    assert echoed == b"x" * len(echoed) and len(echoed) <= 3000
    assert up.stats.cut == 1
    wait_until(lambda: len(echo.received[-1]) >= 3000, timeout=5, what="the part before the cut")
    assert echo.received[-1] == b"x" * 3000  # the broker's side saw part of the message, then EOF
    assert _echo(up.port, b"y" * 8000) == b"y" * 8000  # only the first connection is cut
    down = link_to(parse_profile({"cuts": {"at_byte": 5000, "direction": "down"}}))
    assert _echo(down.port, b"z" * 8000) == b"z" * 5000
    assert echo.received[-1] == b"z" * 8000 and down.stats.cut == 1


def test_a_storm_drops_every_connection_of_every_link(echo):
    with Links(profiles={"a": Profile(), "b": Profile()}, target_port=echo.port) as links:
        socks = [socket.create_connection(("127.0.0.1", links[n].port), timeout=5) for n in ("a", "b", "b")]
        for s in socks:
            s.sendall(b"hi")
            assert s.recv(2) == b"hi"
        assert links.storm() == 3
        assert all(_closed_by_peer(s) for s in socks)
        for s in socks:
            s.close()
        assert _echo(links["a"].port, b"back") == b"back"  # a storm is not an outage


# --------------------------------------------------------------------------------- mosquitto


@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_qos1_upload_over_2g_cut_by_an_outage_arrives_once_after_it(mosquitto):
    fed, pw = mosquitto.federation, mosquitto.passwords
    url = f"mqtt://127.0.0.1:{mosquitto.settings.port}"
    topic = Topics(fed).updates("site-a")
    payload = bytes(random.Random(0).randbytes(16 * 1024))
    slow = dataclasses.replace(BUILT_IN["2g"], outages=Outages())  # 64 kbit/s, 800 ms RTT; outage by hand
    coordinator = mosquitto.settings.coordinator_user
    receiver = MqttClient(url=url, client_id=coordinator, username=coordinator, password=pw[coordinator])
    link = Link(profile=slow, target_port=mosquitto.settings.port)
    site = MqttClient(url=link.url, client_id="site-a", username="site-a", password=pw["site-a"],
                      reconnect_min_delay=0.25, reconnect_max_delay=0.5)
    try:
        assert receiver.connect(timeout=10)
        receiver.subscribe(topic, qos=1)
        assert site.connect(timeout=15)
        before = link.stats.up_bytes
        handle = site.publish(topic, payload, qos=1)
        wait_until(lambda: link.stats.up_bytes - before > 4000, timeout=15, what="4 KB of the upload to cross")
        link.outage(600)  # mid-message: the broker never sees the whole first PUBLISH; ended below
        assert link.stats.dropped == 1 and link.stats.up_bytes - before < len(payload)
        wait_until(lambda: link.stats.refused, timeout=15, what="a reconnect refused during the outage")
        assert link.down() and receiver.receive() is None  # nothing arrived while the link is down
        link.restore()
        handle.result(30)  # sent again after the outage, and acknowledged
        got = receiver.receive(timeout=10)
        assert got is not None and got.payload == payload and got.topic == topic
        assert receiver.receive(timeout=1.0) is None  # exactly once
        assert link.stats.connections >= 2 and link.stats.up_bytes > len(payload)  # the retransmission
    finally:
        site.disconnect()
        receiver.disconnect()
        link.close()
