"""Coordinator workers: the records they forward and what the aggregator makes of them (in
process, on the in-memory broker), and on a real mosquitto: two worker processes share the update
subscription (``$share/...``), one aggregator owns the round; a worker SIGKILLed mid-round loses no
update.

``fednca coordinator run DIR --workers 2`` starts the aggregator and two ``coordinator worker``
processes. With ``FEDNCA_WORKER_KILL_AFTER=Stored`` each worker kills itself right after its first
batch is stored and before it is forwarded or acknowledged (the supervisor restarts it without the
hook); the updates it held come back to it from its persistent session. The round must close with
every update counted once and the model an uninterrupted single-process run gives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from fednca import aggregate, wire
from fednca.aggregate import AggregationConfig
from fednca.config import preset
from fednca.keys import CoordinatorKeys, Registry, SiteKeys, read_coordinator_public
from fednca.model import build, tensors
from fednca.topics import Topics
from fednca.transport.memory import MemoryBroker
from fednca.transport.mqtt import MqttClient
from fednca_app.cli import main
from fednca_broker.cli import WORKER_KILL_ENV
from fednca_broker.config import CONFIG_NAME, FederationConfig
from fednca_broker.coordinator import Coordinator
from fednca_broker.mosquitto import MosquittoSettings, render_acl, write_files
from fednca_broker.store import RoundStore
from fednca_broker.workers import (
    VerifiedRecord, RecordError, Worker, record_key, shared_updates, worker_password_path,
    worker_users,
)
from fednca_broker.verifier import Opened
from fednca_broker.worker_process import retire_workers
from fednca_broker.round_events import UpdateRejected, UpdateVerified
from mosquitto_fixture import MOSQUITTO, RunningMosquitto, free_port

needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

SITES = tuple(f"s{i}" for i in range(1, 9))
FED = "shared"
WAIT = 60.0


def test_records_are_authenticated_and_round_trip():
    key, other = b"k" * 32, b"o" * 32
    row = np.arange(6, dtype=np.float32)
    verified = VerifiedRecord("w1", Opened(UpdateVerified("a", "ab", 2, "c" * 64, 5, 7, True, {"dice": 0.5}), row, 3.5),
                              "0123456789abcdef")  # fmt: skip
    back = VerifiedRecord.decode(verified.encode(key), key, size=6)
    assert back.worker == "w1" and back.opened.event == verified.opened.event and back.opened.norm == 3.5
    assert back.key_id == "0123456789abcdef"
    np.testing.assert_array_equal(back.opened.row, row)
    rejected = VerifiedRecord("w2", Opened(UpdateRejected("b", None, "bad_signature", None)))
    assert VerifiedRecord.decode(rejected.encode(key), key, size=6).opened.event == rejected.opened.event
    data = bytearray(verified.encode(key))
    with pytest.raises(RecordError, match="HMAC"):
        VerifiedRecord.decode(verified.encode(other), key, size=6)
    data[20] ^= 1
    with pytest.raises(RecordError):
        VerifiedRecord.decode(bytes(data), key, size=6)
    with pytest.raises(RecordError, match="values"):
        VerifiedRecord.decode(verified.encode(key), key, size=7)


# -- the aggregator and a worker in one process -----------------------------------------------------

KEY = b"r" * 32
T = Topics(FED)
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def world():
    cfg = preset("fednca")
    model = {n: t.numpy() for n, t in tensors(build(cfg, seed=0)).items()}
    return dict(cfg=cfg, model=model, keys=CoordinatorKeys.generate(), sites={s: SiteKeys.generate() for s in "abc"})


class InProcess:
    """An aggregator (a Coordinator taking records) and one worker on the in-memory broker. The
    broker has no shared subscriptions: the worker subscribes to every site's updates itself."""

    def __init__(self, world, root):
        self.world = world
        self.broker = MemoryBroker(federation=FED)
        self.store = RoundStore(root=root, federation=FED)
        self.registry = Registry(sites={s: k.verify_key for s, k in world["sites"].items()})
        config = FederationConfig(name=FED, model=world["cfg"], max_rounds=None)
        self.coordinator = Coordinator(config=config, store=self.store, keys=world["keys"], registry=self.registry,
                                       client=self.broker.client(client_id="coordinator"), clock=lambda: T0,
                                       initial_model=world["model"], worker_key=KEY)  # fmt: skip
        self.coordinator.start()
        shapes = {n: tuple(a.shape) for n, a in world["model"].items()}
        client = self.broker.client(client_id="w1")
        self.worker = Worker(name="w1", federation=FED, client=client, store=self.store, keys=world["keys"],
                             registry=self.registry, key=KEY, shapes=shapes,
                             max_update_bytes=wire.max_update_bytes(shapes), clock=lambda: T0)  # fmt: skip
        client.connect()
        client.subscribe(T.all_updates, 1)

    def update(self, site, *, round=1, signer=None):
        model = self.world["model"]
        delta = {n: np.full(a.shape, 1e-3, np.float32) for n, a in model.items()}
        return wire.make_update(federation=FED, site=site, round=round, base_sha256=wire.model_sha256(model),
                                samples=1, steps=1, partial=False, metrics={}, delta=delta,
                                signing_key=(signer or self.world["sites"][site]).signing,
                                coordinator_box=self.world["keys"].box.public_key)  # fmt: skip

    def send(self, site, payload):
        sender = self.broker.client(client_id=f"site-{site}")
        sender.connect()
        sender.publish(T.updates(site), payload).result(1)
        sender.disconnect()

    def rejections(self):
        return [(r["site"], r["reason"]) for r in self.store.read_log() if r["kind"] == "update_rejected"]

    def stored(self, round):
        return sorted(p.name.split("-")[0] for p in (self.store.folder / "rounds" / str(round)).glob("*.bin"))


def test_a_record_made_under_a_replaced_key_is_not_counted(world, tmp_path):
    fed = InProcess(world, tmp_path)
    for site in "ac":
        fed.send(site, fed.update(site))
    assert fed.worker.step() == 2  # verified under c's first key, stored, forwarded
    assert fed.stored(1) == ["a", "c"]
    rekeyed = {**fed.registry.sites, "c": SiteKeys.generate().verify_key}
    fed.coordinator.set_registry(Registry(sites=rekeyed))  # enroll --replace before the records are judged
    fed.coordinator.step()
    assert [a.site for a in fed.coordinator.state.accepted] == ["a"]
    assert fed.rejections() == [("c", "wrong_key")]
    assert fed.stored(1) == ["a"]  # the payload it will never count is gone


def test_a_record_under_the_current_key_is_counted(world, tmp_path):
    fed = InProcess(world, tmp_path)
    fed.send("b", fed.update("b"))
    fed.worker.step()
    fed.coordinator.step()
    assert [a.site for a in fed.coordinator.state.accepted] == ["b"]
    assert fed.stored(1) == ["b"]


def test_workers_store_only_the_current_and_next_round(world, tmp_path):
    fed = InProcess(world, tmp_path)
    fed.send("a", fed.update("a", round=7))
    fed.send("b", fed.update("b", round=2))
    fed.send("c", fed.update("c", round=2**31 - 1))
    assert fed.worker.step() == 3
    assert fed.stored(7) == [] and fed.stored(2**31 - 1) == []  # refused before any write
    assert fed.stored(2) == ["b"]  # the next round's model may be saved before the worker looks again
    fed.coordinator.step()
    assert fed.coordinator.state.accepted == ()
    assert sorted(fed.rejections()) == [("a", "unknown_round"), ("b", "unknown_round"), ("c", "unknown_round")]
    assert fed.stored(2) == []  # the aggregator refused it, and deleted what the worker stored


def test_a_record_whose_payload_is_not_stored_is_dropped_not_fatal(world, tmp_path):
    fed = InProcess(world, tmp_path)
    fed.send("a", fed.update("a"))
    fed.worker.step()
    for p in (fed.store.folder / "rounds" / "1").glob("*.bin"):
        p.unlink()
    fed.coordinator.step()
    assert fed.coordinator.state.accepted == ()
    assert fed.broker.queued("coordinator") == 0  # acknowledged: not handed back at every restart
    fed.send("a", fed.update("a"))  # the site sends it again: this time it is stored and counted
    fed.worker.step()
    fed.coordinator.step()
    assert [a.site for a in fed.coordinator.state.accepted] == ["a"]


# -- on a real mosquitto ---------------------------------------------------------------------------


def test_the_acl_gives_the_internal_topic_to_coordinator_accounts_only():
    acl = render_acl(FED, coordinator_user="coordinator", sites=["s1"], workers=worker_users("coordinator", 2))
    blocks = {b.split("\n")[0]: b for b in acl.split("\n\n")[1:]}
    assert blocks["user coordinator-w1"].splitlines()[1:] == [
        f"topic read fednca/{FED}/updates/+", f"topic write fednca/{FED}/verified/+"]
    assert f"topic read fednca/{FED}/verified/+" in blocks["user coordinator"]
    assert "verified" not in blocks["user s1"]
    assert "verified" not in render_acl(FED, coordinator_user="coordinator", sites=["s1"])


@pytest.fixture
def federation(tmp_path):
    """A federation folder (``coordinator init``) with two worker accounts, and mosquitto on files
    written with them (the sites', the coordinator's and the workers' accounts and ACL)."""
    folder = tmp_path / "fed"
    settings = MosquittoSettings(federation=FED, folder=str(tmp_path / "mosquitto"), port=free_port(),
                                 run_as_root=os.geteuid() == 0, workers=2, max_queued_messages=1000)  # fmt: skip
    url = f"mqtt://127.0.0.1:{settings.port}"
    assert main(["coordinator", "init", str(folder), "--federation", FED, "--broker", url,
                 "--quorum", str(len(SITES)), "--max-rounds", "1"]) == 0  # fmt: skip
    config = yaml.safe_load((folder / CONFIG_NAME).read_text())
    config.setdefault("mosquitto", {})["workers"] = 2
    (folder / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
    keys = {s: SiteKeys.generate() for s in SITES}
    for site, k in keys.items():
        assert main(["coordinator", "enroll", str(folder), site, bytes(k.verify_key).hex()]) == 0
    passwords = {"coordinator": "coordinator-secret", **{s: f"{s}-secret" for s in SITES},
                 **{w: f"{w}-secret" for w in worker_users("coordinator", 2)}}  # fmt: skip
    write_files(settings, coordinator_password=passwords["coordinator"],
                site_passwords={s: passwords[s] for s in SITES},
                worker_passwords={w: passwords[w] for w in worker_users("coordinator", 2)})  # fmt: skip
    (folder / "secrets" / "mqtt-password").write_text(passwords["coordinator"] + "\n")
    for w in worker_users("coordinator", 2):
        worker_password_path(folder, w).write_text(passwords[w] + "\n")
        os.chmod(worker_password_path(folder, w), 0o600)
    broker = RunningMosquitto(settings=settings, passwords=passwords)
    broker.start()
    yield folder, broker, keys
    broker.stop()


def wait_for(condition, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.mosquitto
@pytest.mark.slow
@needs_mosquitto
def test_two_workers_share_the_updates_and_a_killed_one_loses_none(federation):
    folder, broker, keys = federation
    store = RoundStore(root=folder / "store", federation=FED)
    initial = store.load_model(1)
    box = read_coordinator_public(folder / "keys").box
    rng = np.random.default_rng(5)
    samples = {s: int(rng.integers(1, 9)) for s in SITES}
    deltas = {s: {n: rng.normal(0, 1e-2, a.shape).astype(np.float32) for n, a in sorted(initial.items())}
              for s in SITES}  # fmt: skip
    updates = {s: wire.make_update(federation=FED, site=s, round=1, base_sha256=wire.model_sha256(initial),
                                   samples=samples[s], steps=3, partial=False, metrics={}, delta=deltas[s],
                                   signing_key=keys[s].signing, coordinator_box=box) for s in SITES}  # fmt: skip
    log_path = folder / "coordinator.log"
    env = {**os.environ, WORKER_KILL_ENV: "Stored"}
    with open(log_path, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "fednca_app.cli", "coordinator", "run", str(folder),
                                  "--workers", "2", "--poll", "0.1", "--log-level", "debug"],
                                 stdout=out, stderr=out, env=env)  # fmt: skip
    try:
        wait_for(lambda: "sharing $share" in log_path.read_text() and log_path.read_text().count("sharing $share") >= 2,
                 "both workers to subscribe")  # fmt: skip
        for site in SITES:
            client = MqttClient(url=broker.url, client_id=f"site-{site}", username=site, password=f"{site}-secret")
            try:
                assert client.connect(5)
                client.publish(f"fednca/{FED}/updates/{site}", updates[site]).result(5)
            finally:
                client.disconnect()
        try:
            assert child.wait(timeout=WAIT) == 0, log_path.read_text()[-4000:]
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the round did not close:\n{log_path.read_text()[-4000:]}") from None
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
    text = log_path.read_text()
    assert "worker 1 exited" in text or "worker 2 exited" in text, "no worker was killed mid-round"
    forwarded = {w for w in worker_users("coordinator", 2) if re.search(rf"worker {w}: [1-9][0-9]* forwarded", text)}
    assert forwarded == set(worker_users("coordinator", 2)), "the subscription was not shared"
    state = store.load_state()
    assert (state.round, str(state.status)) == (1, "closed")
    assert sorted(a.site for a in state.accepted) == sorted(SITES)
    accepted = [r for r in store.read_log() if r["kind"] == "update_accepted"]
    assert sorted(r["site"] for r in accepted) == sorted(SITES)  # each counted once
    travelled = [({n: a.astype(np.float16).astype(np.float32) for n, a in deltas[s].items()}, samples[s])
                 for s in SITES]  # fmt: skip
    expected = wire.model_sha256(aggregate.apply(initial, aggregate.aggregate(travelled, AggregationConfig())))
    assert wire.model_sha256(store.load_model(2)) == expected
    assert shared_updates(FED) == f"$share/fednca-coordinator/fednca/{FED}/updates/+"


@pytest.mark.mosquitto
@pytest.mark.slow
@needs_mosquitto
def test_broker_config_makes_the_worker_accounts_the_configuration_asks_for(tmp_path):
    folder = tmp_path / "fed"
    assert main(["coordinator", "init", str(folder), "--federation", FED, "--broker", "mqtt://127.0.0.1:18831"]) == 0
    config = yaml.safe_load((folder / CONFIG_NAME).read_text())
    config.setdefault("mosquitto", {})["workers"] = 2
    (folder / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["coordinator", "broker-config", str(folder)]) in (0, 2)  # 2: mosquitto's user cannot enter tmp
    users = [line.split(":")[0] for line in (folder / "mosquitto" / "passwd").read_text().splitlines()]
    assert {"coordinator-w1", "coordinator-w2"} <= set(users)
    acl = (folder / "mosquitto" / "acl").read_text()
    assert f"user coordinator-w2\ntopic read fednca/{FED}/updates/+\ntopic write fednca/{FED}/verified/+" in acl
    for w in worker_users("coordinator", 2):
        assert os.stat(worker_password_path(folder, w)).st_mode & 0o077 == 0
    assert main(["coordinator", "run", str(folder), "--workers", "3"]) == 2  # more workers than accounts


def _sealed_updates(folder, keys, sites):
    store = RoundStore(root=folder / "store", federation=FED)
    initial = store.load_model(1)
    box = read_coordinator_public(folder / "keys").box
    delta = {n: np.full(a.shape, 1e-3, np.float32) for n, a in sorted(initial.items())}
    return {s: wire.make_update(federation=FED, site=s, round=1, base_sha256=wire.model_sha256(initial), samples=1,
                                steps=1, partial=False, metrics={}, delta=delta, signing_key=keys[s].signing,
                                coordinator_box=box) for s in sites}  # fmt: skip


def _publish(broker, site, payload):
    client = MqttClient(url=broker.url, client_id=f"site-{site}", username=site, password=f"{site}-secret")
    try:
        assert client.connect(5)
        client.publish(f"fednca/{FED}/updates/{site}", payload).result(5)
    finally:
        client.disconnect()


def _received(client, quiet=1.0):
    out = []
    while (m := client.receive(quiet)) is not None:
        client.ack(m)
        out.append(m)
    return out


@pytest.mark.mosquitto
@needs_mosquitto
def test_retiring_a_worker_hands_over_what_its_session_held_and_ends_it(federation):
    """After ``run --workers 2``, ``run --workers 1`` must not leave worker 2's persistent session
    in the shared subscription: mosquitto would keep queueing half the updates to it, and a clean
    start alone would discard them (mosquitto 2.0). Retiring drains it, then ends it."""
    folder, broker, keys = federation
    w1, w2 = worker_users("coordinator", 2)
    sessions = {}
    for user in (w1, w2):  # both workers ran once, then stopped: their sessions stay, subscribed
        sessions[user] = MqttClient(url=broker.url, client_id=user, username=user, password=f"{user}-secret")
        assert sessions[user].connect(5)
        sessions[user].subscribe(shared_updates(FED), 1)
        sessions[user].disconnect()
    aggregator = MqttClient(url=broker.url, client_id="coordinator", username="coordinator",
                            password="coordinator-secret")  # fmt: skip
    assert aggregator.connect(5)
    aggregator.subscribe(f"fednca/{FED}/verified/+", 1)
    updates = _sealed_updates(folder, keys, SITES)
    for site in SITES:
        _publish(broker, site, updates[site])
    handed = retire_workers(folder, 2, quiet=1.0)
    assert handed >= 1, "worker 2's session was handed none of the updates"
    records = _received(aggregator)
    assert [m.topic for m in records] == [f"fednca/{FED}/verified/{w2}"] * handed
    assert all(VerifiedRecord.decode(m.payload, record_key(folder / "keys"), size=7262).opened.event.site in SITES
               for m in records)  # fmt: skip
    assert (folder / "store").is_dir() and len(list((folder / "store").rglob("rounds/1/*.bin"))) == handed
    worker1 = MqttClient(url=broker.url, client_id=w1, username=w1, password=f"{w1}-secret")
    assert worker1.connect(5)
    try:
        assert len(_received(worker1)) == len(SITES) - handed  # nothing lost between the two
        later = _sealed_updates(folder, keys, SITES[:4])
        for site in SITES[:4]:
            _publish(broker, site, later[site])
        assert len(_received(worker1)) == 4  # worker 2 is no longer a member: all come to worker 1
    finally:
        worker1.disconnect()
        aggregator.disconnect()
    gone = MqttClient(url=broker.url, client_id=w2, username=w2, password=f"{w2}-secret")
    assert gone.connect(5)
    try:
        assert _received(gone, quiet=0.5) == []  # its session ended: nothing queued, no subscription
    finally:
        gone.disconnect()


def test_a_restarted_aggregator_counts_stored_payloads_whose_records_the_broker_lost(world, tmp_path):
    fed = InProcess(world, tmp_path)
    for site in "ab":
        fed.send(site, fed.update(site))
    fed.worker.step()  # stored, forwarded, acknowledged to the sites
    fed.send("c", fed.update("c", round=1, signer=SiteKeys.generate()))
    fed.worker.step()  # refused: nothing stored
    # The broker crashes before its autosave: the records die with it; the aggregator restarts.
    again = Coordinator(config=FederationConfig(name=FED, model=world["cfg"], max_rounds=None), store=fed.store,
                        keys=world["keys"], registry=fed.registry,
                        client=MemoryBroker(federation=FED).client(client_id="coordinator"), clock=lambda: T0,
                        initial_model=world["model"], worker_key=KEY)  # fmt: skip
    again.start()
    assert sorted(a.site for a in again.state.accepted) == ["a", "b"]
    assert sorted(r["site"] for r in fed.store.read_log() if r["kind"] == "update_accepted") == ["a", "b"]
    assert fed.stored(1) == ["a", "b"]
    again.close()
