"""The status message: one definition, written by the daemon, read back strictly by everyone."""

import json

import pytest

from fednca.errors import FedNCAError
from fednca.telemetry import MAX_BYTES, MAX_TEXT, StatusMessage, TelemetryError, parse_status
from fednca_daemon.telemetry import Snapshot, status_json, status_message

SNAP = Snapshot(site="site-a", version="0.1.0", time=1700000000.7, state="training", round=7, steps=120,
                planned=300, samples_per_s=3.14159, gates=("temperature 80.0 C",), cpu_percent=49.87,
                rss_bytes=300 * 2**20, temperature_c=61.23, battery_percent=87.6, charging=False, outbox=1,
                last_receipt="accepted")


def test_what_the_daemon_writes_parses_back_to_the_same_message():
    payload = status_json(SNAP)
    assert parse_status(payload) == status_message(SNAP)
    assert list(json.loads(payload))[:5] == ["v", "site", "version", "time", "state"]  # wire order kept


def _with(**changes) -> bytes:
    body = json.loads(status_json(SNAP))
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("payload, why", [
    (b"offline", "JSON"),
    (b"\xff{}", "UTF-8"),
    (b"[]", "object"),
    (b"{" + b'"a":1,' * 1000 + b"}", "larger"),
    (_with(v=2), "version"),
    (_with(v=True), "version"),
    (_with(extra=1), "unknown extra"),
    (_with(state="dancing"), "state"),
    (_with(site="Site/A"), "site"),
    (_with(round="7"), "round"),
    (_with(round=-1), "round"),
    (_with(steps=True), "steps"),
    (_with(progress=1.5), "progress"),
    (_with(cpu_percent="hot"), "cpu_percent"),
    (_with(error="e" * (MAX_TEXT + 1)), "error"),
    (_with(gates=["a"] * 5), "gates"),
    (_with(gates="a"), "gates"),
    (_with(charging=1), "charging"),
    (status_json(SNAP).replace(b"NaN", b"").replace(b'"chunk_s":null', b'"chunk_s":NaN'), "NaN"),
    (status_json(SNAP)[:-1] + b',"outbox":2}', "duplicate"),
])
def test_a_malformed_status_is_a_typed_error(payload, why):
    with pytest.raises(TelemetryError, match=why) as info:
        parse_status(payload)
    assert isinstance(info.value, FedNCAError)


def test_a_missing_field_is_named():
    body = json.loads(status_json(SNAP))
    del body["outbox"]
    with pytest.raises(TelemetryError, match="missing outbox"):
        parse_status(json.dumps(body).encode())


def test_an_absurd_sensor_reading_is_dropped_not_sent():
    m = status_message(Snapshot(site="a", version="1", time=0, state="idle", temperature_c=1e9, memory_percent=-3))
    assert m.temperature_c is None and m.memory_percent is None
    with pytest.raises(TelemetryError):  # the message type itself refuses it
        StatusMessage(**{**m.__dict__, "temperature_c": 1e9})


def test_the_largest_message_the_producer_can_write_fits():
    worst = Snapshot(site="s" * 63, version="v" * 500, time=2**39, state="submitted", round=2**52, steps=2**52,
                     planned=2**52, samples_per_s=1e11, chunk_s=1e11, gates=("g" * 500,) * 10, cpu_percent=1e5,
                     rss_bytes=2**60, memory_percent=99.9, temperature_c=-40.5, battery_percent=100.0,
                     charging=True, bytes_sent=2**52, bytes_received=2**52, outbox=2**52, error="\u00e9" * 5000,
                     last_receipt="r" * 500)
    out = status_json(worst)
    assert len(out) <= MAX_BYTES and parse_status(out) == status_message(worst)
