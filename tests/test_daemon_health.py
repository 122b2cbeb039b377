"""Telemetry JSON, the STATUS line, sensor choice and sd_notify over a real unix datagram socket."""

import json
import os
import socket
from collections import namedtuple

import pytest

from fednca.notify import Notifier
from fednca_daemon.sensors import Sensors, pick_temperature, zone_temperature
from fednca_daemon.telemetry import MAX_BYTES, Snapshot, status_json, status_line

T = namedtuple("T", "label current high critical")


def test_status_json_holds_every_field_and_stays_bounded():
    snap = Snapshot(site="site-a", version="0.1.0", time=1700000000.7, state="training", round=7, steps=120,
                    planned=300, samples_per_s=3.14159, chunk_s=5.01, gates=(), cpu_percent=49.87,
                    rss_bytes=300 * 2**20, memory_percent=41.0, temperature_c=61.234, battery_percent=None,
                    charging=None, bytes_sent=1234, bytes_received=5678, outbox=1, last_receipt="accepted",
                    error="x" * 1000)
    body = json.loads(status_json(snap))
    assert body["state"] == "training" and body["round"] == 7 and body["progress"] == 0.4
    assert body["samples_per_s"] == 3.14 and body["rss_mb"] == 300.0 and body["temperature_c"] == 61.2
    assert body["time"] == 1700000000 and body["outbox"] == 1 and len(body["error"]) == 160
    assert set(body) == {"v", "site", "version", "time", "state", "round", "steps", "planned", "progress",
                         "samples_per_s", "chunk_s", "gates", "cpu_percent", "rss_mb", "memory_percent",
                         "temperature_c", "battery_percent", "charging", "bytes_sent", "bytes_received", "outbox",
                         "last_receipt", "error"}
    worst = Snapshot(site="s" * 63, version="v" * 500, time=0, state="training", gates=("g" * 500,) * 10,
                     error="e" * 5000, last_receipt="r" * 500, samples_per_s=float("nan"))
    out = status_json(worst)
    assert len(out) <= MAX_BYTES and json.loads(out)["samples_per_s"] is None


def test_status_line_is_one_human_line():
    snap = Snapshot(site="a", version="1", time=0, state="training", round=7, steps=120, planned=300,
                    samples_per_s=3.1)
    assert status_line(snap) == "training round 7: 120/300 steps (40%), 3.1 samples/s"
    paused = Snapshot(site="a", version="1", time=0, state="paused", round=7, steps=3, planned=300,
                      gates=("temperature 81.0 C",))
    assert status_line(paused).endswith("; paused for temperature 81.0 C")
    idle = Snapshot(site="a", version="1", time=0, state="idle", round=7, last_receipt="accepted")
    assert status_line(idle) == "idle round 7 (last update: accepted)"
    assert "\n" not in status_line(Snapshot(site="a", version="1", time=0, state="idle", error="two\nlines"))


def test_temperature_prefers_the_cpu_sensor_of_each_board():
    pi = {"rp1_adc": [T("", 30.0, None, None)], "cpu_thermal": [T("", 52.5, None, None)]}
    assert pick_temperature(pi) == 52.5
    jetson = {"GPU-therm": [T("", 70.0, None, None)], "CPU-therm": [T("", 48.0, None, None)]}
    assert pick_temperature(jetson) == 48.0
    laptop = {"coretemp": [T("Package id 0", 61.0, 100, 100), T("Core 0", 58.0, 100, 100)]}
    assert pick_temperature(laptop) == 61.0
    other = {"nvme": [T("", 40.0, None, None)], "weird": [T("", 66.0, None, None), T("", float("nan"), 0, 0)]}
    assert pick_temperature(other) == 66.0
    assert pick_temperature({}) is None


def test_sysfs_thermal_zones_are_the_fallback(tmp_path):
    assert zone_temperature(["45123\n", "garbage", "51000", "-273000"]) == 51.0
    for i, text in enumerate(["44000\n", "47500\n"]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "temp").write_text(text)
    zones = str(tmp_path / "thermal_zone*" / "temp")
    assert Sensors(zones_glob=zones, hwmon=lambda: {}).temperature() == 47.5
    hwmon = {"cpu_thermal": [T("", 52.5, None, None)]}
    assert Sensors(zones_glob=zones, hwmon=lambda: hwmon).temperature() == 52.5


def test_process_stats_follow_a_trainer(tmp_path):
    sensors = Sensors()
    mine = sensors.processes()
    sensors.follow_trainer(os.getppid())
    both = sensors.processes()
    assert both.rss_bytes > mine.rss_bytes and both.trainer_rss_bytes > 0
    sensors.follow_trainer(None)
    assert sensors.processes().trainer_rss_bytes == 0


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def test_sd_notify_messages_reach_a_real_datagram_socket(notify_socket):
    path, sock = notify_socket
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 2.0
    assert n.ready("idle") and n.status("training round 3:\n 5/10") and n.watchdog() and n.stopping()
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=idle", "STATUS=training round 3: 5/10", "WATCHDOG=1", "STOPPING=1"]
    n.close()


def test_sd_notify_abstract_socket_and_absent_systemd():
    name = f"fednca-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier(env={"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
    quiet = Notifier(env={})
    assert not quiet.enabled and not quiet.ready() and quiet.watchdog_interval is None
    # a watchdog meant for another process is not ours to ping
    assert Notifier(env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
