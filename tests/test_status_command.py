"""`fednca status` against a real mosquitto: retained telemetry in, one row per site out."""

from __future__ import annotations

import json
import time

import pytest

from fednca_app.cli import main
from fednca_daemon.telemetry import Snapshot, status_json
from fednca.transport.mqtt import MqttClient

pytestmark = pytest.mark.mosquitto
FED = "clinic"


def test_status_shows_each_sites_retained_telemetry(tmp_path, mosquitto_factory, capsys):
    broker = mosquitto_factory(federation=FED, sites=("s1", "s2"))
    folder = tmp_path / "fed"
    assert main(["coordinator", "init", str(folder), "--federation", FED, "--broker", broker.url]) == 0
    (folder / "secrets" / "mqtt-password").write_text(broker.passwords["coordinator"] + "\n")
    payloads = {
        "s1": status_json(Snapshot(site="s1", version="1", time=time.time(), state="training", round=3, steps=25,
                                   planned=100, cpu_percent=47.0, temperature_c=58.5, outbox=0)),
        "s2": b"offline",
    }
    for site, payload in payloads.items():
        client = MqttClient(url=broker.url, client_id=site, username=site, password=broker.passwords[site])
        assert client.connect(5)
        client.publish(f"fednca/{FED}/status/{site}", payload, qos=1, retain=True).result(5)
        client.disconnect()
    capsys.readouterr()

    assert main(["status", str(folder), "--json", "--wait", "1.0"]) == 0
    view = json.loads(capsys.readouterr().out)
    sites = {s["site"]: s for s in view["sites"]}
    assert sites["s1"]["state"] == "training" and sites["s1"]["round"] == 3 and sites["s1"]["progress"] == 0.25
    assert sites["s2"]["state"] == "offline"
    assert view["round"] is None or view["round"]["round"] >= 1

    assert main(["status", str(folder), "--wait", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "s1" in text and "25%" in text and "offline" in text and text.splitlines()[0].startswith("federation clinic")


def test_status_names_an_unreachable_broker(tmp_path, capsys):
    folder = tmp_path / "fed"
    assert main(["coordinator", "init", str(folder), "--federation", FED, "--broker", "mqtt://127.0.0.1:9"]) == 0
    assert main(["status", str(folder), "--wait", "0.1", "--timeout", "1"]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
