"""A site's link in its telemetry: reconnects and the last PUBLISH-to-PUBACK time, counted by the
transport, carried in the status message (optional fields, so older readers and writers still
meet), and shown by the fleet view behind ``fednca status``."""

from __future__ import annotations

import json

import pytest

from fednca.telemetry import TelemetryError, parse_status
from fednca.topics import Topics
from fednca.transport.memory import MemoryBroker
from fednca_app.fleet import render, row
from fednca_broker.telemetry import StatusCache
from fednca_daemon.telemetry import Snapshot, status_json, status_message

T = Topics("fed")


def snapshot(**fields) -> Snapshot:
    return Snapshot(**{"site": "a", "version": "1", "time": 1000, "state": "submitted", "round": 2,
                       "planned": 10, "steps": 10, **fields})


def test_the_link_fields_travel_in_the_status_message_and_are_read_back():
    payload = status_json(snapshot(reconnects=3, rtt_s=0.8126, bytes_sent=45_210, bytes_received=118_400))
    m = parse_status(payload)
    assert (m.reconnects, m.rtt_ms, m.bytes_sent, m.bytes_received) == (3, 813, 45_210, 118_400)
    body = json.loads(payload)
    assert list(body)[-2:] == ["reconnects", "rtt_ms"]  # after every field an older reader knows


def test_unknown_link_values_are_left_out_and_an_older_daemons_status_still_parses():
    body = json.loads(status_json(snapshot()))
    assert "reconnects" not in body and "rtt_ms" not in body  # not measured yet: not sent
    m = parse_status(json.dumps(body).encode())
    assert (m.reconnects, m.rtt_ms) == (None, None)
    absurd = status_message(snapshot(rtt_s=float("nan"), reconnects=-1))
    assert (absurd.rtt_ms, absurd.reconnects) == (None, None)  # a measured value out of range is dropped
    for bad in ({"rtt_ms": -5}, {"rtt_ms": 1.5}, {"reconnects": True}, {"rtt_ms": 10**12}):
        with pytest.raises(TelemetryError):
            parse_status(json.dumps({**body, **bad}).encode())


def test_a_coordinator_keeps_a_status_with_the_link_fields_as_any_other():
    cache = StatusCache(clock=lambda: 5.0)
    payload = status_json(snapshot(reconnects=1, rtt_s=0.4))
    assert cache.take(site="a", payload=payload, enrolled=True)
    assert cache.snapshot()["a"].telemetry["rtt_ms"] == 400


def test_the_fleet_view_shows_each_sites_link():
    slow = row("a", status_json(snapshot(reconnects=2, rtt_s=0.812, bytes_sent=45_210, bytes_received=118_400)),
               now=1010)
    assert (slow.rtt_ms, slow.reconnects, slow.bytes_sent, slow.bytes_received) == (812, 2, 45_210, 118_400)
    older = row("b", status_json(snapshot(site="b")), now=1010)
    lines = render([slow, older]).splitlines()
    header, a, b = lines[0], lines[2], lines[3]
    assert "rtt" in header and "reconn." in header and "sent/recv" in header
    assert "812 ms" in a and "45/118 kB" in a
    cells = a.split()
    assert cells[cells.index("ms") + 1] == "2"  # the reconnects follow the rtt
    assert "812" not in b and " - " in b
    assert row("c", status_json(snapshot(site="c", rtt_s=42.0)), now=1010).rtt_ms == 42_000
    assert "42 s" in render([row("c", status_json(snapshot(site="c", rtt_s=42.0)), now=1010)])


def test_the_transport_counts_reconnects_and_the_last_round_trip():
    broker = MemoryBroker()
    site = broker.client(client_id="a")
    assert site.connect(1) and site.reconnects == 0 and site.last_rtt_s is None
    site.publish(T.updates("a"), b"u").result(1)
    assert site.last_rtt_s == 0.0  # in memory the broker answers at once
    broker.drop("a")  # the link is cut; the client connects again as soon as the broker runs
    broker.drop("a")
    assert site.connected and site.reconnects == 2
    site.disconnect()
