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
    broker = mosquitto_factory(federation=FED, sites=("s1", "s2"), observer_users=("fednca-status",))
    folder = tmp_path / "fed"
    assert main(["coordinator", "init", str(folder), "--federation", FED, "--broker", broker.url]) == 0
    (folder / "secrets" / "mqtt-password").write_text(broker.passwords["coordinator"] + "\n")
    (folder / "secrets" / "fednca-status-mqtt-password").write_text(broker.passwords["fednca-status"] + "\n")
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


def _view(tmp_path, *, finished, latest):
    import types

    from fednca_app.commands.status import view
    from fednca_broker.store import RoundStore
    from history_support import write_history

    cfg = types.SimpleNamespace(store_root=tmp_path / "store", federation=types.SimpleNamespace(name=FED))
    now = time.time()
    write_history(RoundStore(root=cfg.store_root, federation=FED), now=now, finished=finished)
    return view(cfg, RoundStore, {"site-a": None}, latest, now)


def test_status_view_shows_learning_revocation_errors_and_a_finished_federation(tmp_path):
    latest = {s: status_json(Snapshot(site=s, version="1", time=time.time(), state="training", round=3, steps=25,
                                      planned=100)) for s in ("site-a", "site-b")}  # fmt: skip
    text, data = _view(tmp_path / "open", finished=False, latest=latest)
    sites = {s["site"]: s for s in data["sites"]}
    assert sites["site-b"]["state"] == "revoked" and sites["site-a"]["state"] == "training"
    assert sites["site-a"]["error"] == "update rejected: stale_round" and sites["site-a"]["dice"] == 0.52
    assert [r["mean"]["dice_global"] for r in data["rounds"]] == [0.30, 0.50]
    assert isinstance(data["round"]["deadline"], float) and data["round"]["finished"] is False
    assert "in 59 min" in text and "revoked" in text and "0.500" in text
    text, data = _view(tmp_path / "done", finished=True, latest=latest)
    assert data["round"]["finished"] is True
    first = text.splitlines()[0]
    assert "finished after 2 rounds" in first and "deadline" not in first
