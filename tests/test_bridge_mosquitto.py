"""Two real mosquittos, central and regional, bridged from the files ``fednca coordinator bridge`` writes.

The federation is set up with the operator's commands (``init``, ``enroll``, ``enroll --region``,
``bridge``), the central broker and the coordinator run as processes (``fednca coordinator run``),
and the regional broker reaches the central one through a link of the harness's emulator that can
cut the WAN. The sites are simulated: each is an MQTT client with its enrolled key that publishes
a real signed and sealed update and keeps a persistent session, as a daemon does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os

import numpy as np
import pytest
import yaml

from e2e_support import MODEL, TRAIN, Listener, relay, wait_until
from fednca import wire
from fednca.atomic import write_text
from fednca.keys import SiteKeys, read_coordinator_public
from fednca.topics import Topics
from fednca_app import harness
from fednca_app.cli import main
from fednca_broker import bridge_setup, mosquitto
from fednca_broker.config import CONFIG_NAME, load_config, to_yaml_dict
from fednca_broker.regions import read_regions
from fednca_broker.store import RoundStore
from mosquitto_fixture import MOSQUITTO

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]

FED = "bridged"
CENTRAL_SITES, REGIONAL_SITES = ("c1",), ("r1", "r2")


@dataclasses.dataclass
class Site:
    name: str
    keys: SiteKeys
    password: str
    url: str
    listener: Listener | None = None

    def connect(self, topics: Topics) -> None:
        self.listener = Listener(url=self.url, username=self.name, password=self.password, client_id=self.name,
                                 topics=[topics.round, topics.receipts(self.name)])  # fmt: skip

    def rounds(self) -> list[bytes]:
        """The distinct round announcements received, in order."""
        assert self.listener is not None
        return list(dict.fromkeys(m.payload for m in self.listener.messages if m.topic.endswith("/round")))

    def receipts(self, fed_folder, federation: str) -> list[wire.Receipt]:
        assert self.listener is not None
        pub = read_coordinator_public(fed_folder / "keys")
        return [wire.open_receipt(m.payload, coordinator_verify_key=pub.verify, federation=federation,
                                  topic_site=self.name)
                for m in self.listener.messages if "/receipts/" in m.topic]  # fmt: skip


class Bridged:
    """The federation folder, its two brokers, the relay between them, the coordinator, the sites."""

    def __init__(self, tmp_path) -> None:
        self.folder = tmp_path / "fed"
        self.topics = Topics(FED)
        central_port, regional_port = harness.free_port(), harness.free_port()
        assert main(["coordinator", "init", str(self.folder), "--federation", FED, "--quorum", "3",
                     "--max-rounds", "2", "--broker", f"mqtt://127.0.0.1:{central_port}"]) == 0  # fmt: skip
        cfg = load_config(self.folder / CONFIG_NAME)
        if os.geteuid() == 0:  # pytest's folders are root's alone: mosquitto stays root to read them
            cfg = dataclasses.replace(cfg, mosquitto=dataclasses.replace(cfg.mosquitto, run_as_root=True))
            write_text(cfg.config_path, yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False), mode=0o640)
        self.relay = relay(broker_port=central_port)  # the WAN between the region and the hub
        assert main(["coordinator", "bridge", str(self.folder), "eu", "--broker", f"mqtt://127.0.0.1:{regional_port}",
                     "--central", f"mqtt://127.0.0.1:{self.relay.port}"]) == 0  # fmt: skip
        self.sites: dict[str, Site] = {}
        for name in (*CENTRAL_SITES, *REGIONAL_SITES):
            keys = SiteKeys.generate()
            region = ["--region", "eu"] if name in REGIONAL_SITES else []
            sheet = _enroll(self.folder, name, keys, region)
            self.sites[name] = Site(name=name, keys=keys, password=sheet["mqtt_password"], url=sheet["broker"])
        assert {s.url for s in self.sites.values()} == {f"mqtt://127.0.0.1:{central_port}",
                                                         f"mqtt://127.0.0.1:{regional_port}"}
        self.cfg = load_config(self.folder / CONFIG_NAME)
        self.parties = harness.ProcessParties(federation=harness.FederationFolder(folder=self.folder, sites=()),
                                              log_dir=tmp_path / "logs")  # fmt: skip
        region = read_regions(self.folder).regions["eu"]
        account = mosquitto.broker_account(self.cfg.mosquitto.user)
        self.regional = harness.Mosquitto(settings=bridge_setup.regional_settings(self.cfg, region, account=account),
                                          log_path=tmp_path / "logs" / "regional.log")  # fmt: skip
        self.store = RoundStore(root=self.cfg.store_root, federation=FED)
        self.box = read_coordinator_public(self.cfg.keys_dir).box

    def start(self) -> None:
        self.parties.start_broker()
        self.regional.start()
        self.parties.start_coordinator()
        for site in self.sites.values():
            site.connect(self.topics)

    def publish_update(self, name: str, round: int) -> None:
        """``name``'s sealed update for ``round`` on the broker it connects to, acknowledged by it."""
        model = self.store.load_model(round)
        rng = np.random.default_rng(round * 100 + len(name))
        delta = {n: rng.normal(0, 1e-3, a.shape).astype(np.float32) for n, a in sorted(model.items())}
        site = self.sites[name]
        payload = wire.make_update(federation=FED, site=name, round=round, base_sha256=wire.model_sha256(model),
                                   samples=10, steps=5, partial=False, metrics={"loss": 0.5}, delta=delta,
                                   signing_key=site.keys.signing, coordinator_box=self.box)  # fmt: skip
        assert site.listener is not None
        site.listener.client.publish(self.topics.updates(name), payload, qos=1).result(10)

    def accepted(self, name: str, round: int) -> bool:
        return any(r.round == round and r.accepted for r in self.sites[name].receipts(self.folder, FED))

    def aggregated(self) -> dict[int, set[str]]:
        return {r["round"]: set(r["sites"]) for r in self.store.read_log() if r["kind"] == "round_aggregated"}

    def tails(self) -> str:
        return self.parties.tails() + f"\n--- regional.log ---\n{self.regional.process.log()[-2500:]}"

    def close(self) -> None:
        for site in self.sites.values():
            if site.listener is not None:
                site.listener.stop()
                site.listener.client.disconnect()
        self.relay.close()
        self.regional.stop()
        assert self.parties.close() == []


def _enroll(folder, name: str, keys: SiteKeys, extra: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["coordinator", "enroll", str(folder), name, bytes(keys.verify_key).hex(), "--json", *extra]) == 0
    return json.loads(out.getvalue())


@pytest.fixture
def bridged(tmp_path):
    federation = Bridged(tmp_path)
    federation.start()
    yield federation
    federation.close()


def test_rounds_close_with_sites_on_both_brokers_and_a_cut_wan_link_loses_nothing(bridged):
    b = bridged
    c1, r1, r2 = (b.sites[n] for n in ("c1", "r1", "r2"))
    # The retained round 1 reaches the regional broker through the bridge (an 'in' topic).
    wait_until(lambda: all(s.rounds() for s in b.sites.values()), timeout=60, what="round 1 on both brokers")
    assert r1.rounds() == c1.rounds()
    # Round 1: the regional sites' updates cross the bridge out, their receipts come back in.
    for name in REGIONAL_SITES:
        b.publish_update(name, 1)
    wait_until(lambda: b.accepted("r1", 1) and b.accepted("r2", 1), timeout=60, what="the regional receipts")

    b.relay.outage()  # the WAN link drops, until restore()
    b.publish_update("c1", 1)  # the last update of round 1: the round closes while the region is cut off
    wait_until(lambda: len(c1.rounds()) == 2, timeout=60, what="round 2 announced on the central broker")
    assert len(r1.rounds()) == 1  # the region has not heard of round 2: the link is down
    for name in REGIONAL_SITES:  # round 2 trains on: the regional broker takes the updates and keeps them
        b.publish_update(name, 2)
    b.publish_update("c1", 2)
    assert b.aggregated() == {1: {"c1", "r1", "r2"}}
    b.relay.restore()

    wait_until(lambda: b.parties.returncode("coordinator") == 0, timeout=90, what="the coordinator to finish")
    assert b.aggregated() == {1: {"c1", "r1", "r2"}, 2: {"c1", "r1", "r2"}}  # nothing lost either way
    wait_until(lambda: b.accepted("r1", 2) and b.accepted("r2", 2), timeout=60, what="round 2 receipts in the region")
    wait_until(lambda: r1.rounds() == c1.rounds() == r2.rounds(), timeout=60,
               what="the final announcement in the region")  # fmt: skip
    assert len(c1.rounds()) == 3  # rounds 1 and 2, then the final model


def test_the_regional_broker_forwards_what_it_holds_after_the_central_broker_restarts(bridged):
    b = bridged
    wait_until(lambda: all(s.rounds() for s in b.sites.values()), timeout=60, what="round 1 on both brokers")
    b.publish_update("r1", 1)
    wait_until(lambda: b.accepted("r1", 1), timeout=60, what="r1's receipt")
    b.parties.stop("mosquitto")  # the hub goes down, persistence saved; the coordinator and the bridge retry
    b.publish_update("r2", 1)  # held by the regional broker meanwhile
    b.parties.restart("mosquitto")
    c1 = b.sites["c1"].listener
    assert c1 is not None
    wait_until(lambda: c1.client.connected, timeout=60, what="c1 back on the central broker")
    b.publish_update("c1", 1)
    wait_until(lambda: 1 in b.aggregated(), timeout=90, what="round 1 to close after the restart")
    assert b.aggregated()[1] == {"c1", "r1", "r2"}
    wait_until(lambda: b.accepted("r2", 1), timeout=60, what="r2's receipt after the restart")


def test_real_daemons_on_both_brokers_finish_the_federation_through_the_bridge(tmp_path):
    """Two site daemons, ``site0`` on the central broker and ``site1`` on the regional one (its
    daemon.yaml names the regional broker, as ``bridge`` tells the operator), train two rounds."""
    central_port, regional_port = harness.free_port(), harness.free_port()
    regional_url = f"mqtt://127.0.0.1:{regional_port}"
    made = harness.set_up(tmp_path / "work", federation=FED, sites=2, rounds=2, quorum=2,
                          url=f"mqtt://127.0.0.1:{central_port}", model=MODEL, train=TRAIN, grace=0.0,
                          train_images=8, chunk_s=0.2, telemetry_s=1.0, site_urls={"site1": regional_url})  # fmt: skip
    cfg = made.config()
    if os.geteuid() == 0:
        cfg = dataclasses.replace(cfg, mosquitto=dataclasses.replace(cfg.mosquitto, run_as_root=True))
        write_text(cfg.config_path, yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False), mode=0o640)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["coordinator", "bridge", str(made.folder), "eu", "--broker", regional_url, "--site", "site1"]) == 0
    parties = harness.ProcessParties(federation=made, log_dir=tmp_path / "logs")
    region = read_regions(made.folder).regions["eu"]
    regional = harness.Mosquitto(settings=bridge_setup.regional_settings(cfg, region, account=mosquitto.broker_account(
        cfg.mosquitto.user)), log_path=tmp_path / "logs" / "regional.log")  # fmt: skip
    try:
        parties.start_broker()
        regional.start()
        parties.start()
        wait_until(parties.finished, timeout=300, what="the federation to finish")
        store = RoundStore(root=cfg.store_root, federation=FED)
        rounds = {r["round"]: set(r["sites"]) for r in store.read_log() if r["kind"] == "round_aggregated"}
        assert rounds == {1: {"site0", "site1"}, 2: {"site0", "site1"}}
        assert "New client connected" in regional.process.log() and "as site1" in regional.process.log()
        telemetry = wait_until(lambda: "site1" in (t := parties.telemetry()) and t, timeout=60,
                               what="site1's telemetry on the central broker")  # fmt: skip
        assert telemetry["site1"]  # its status crossed the bridge to where the operator's views read it
    finally:
        regional.stop()
        assert parties.close() == []
