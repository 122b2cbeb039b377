"""The coordinator service on the in-memory broker, with a fake clock: nothing here sleeps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fednca import aggregate, wire
from fednca.aggregate import AggregationConfig
from fednca.config import preset
from fednca.keys import CoordinatorKeys, Registry, SiteKeys
from fednca.model import build, tensors
from fednca.topics import COORDINATOR, SITE, Topics
from fednca.transport.memory import MemoryBroker
from fednca_broker.config import FederationConfig
from fednca_broker.coordinator import NO_UPDATE_ID, Coordinator, CoordinatorError
from fednca_broker.rounds import RoundConfig
from fednca_broker.store import RoundStore

FED = "fed"
T0 = 1_800_000_000.0
SITES = ("a", "b", "c")
SAMPLES = {"a": 1, "b": 2, "c": 5}
T = Topics(FED)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Crash(Exception):
    """Stands for SIGKILL in the in-process crash tests."""


@pytest.fixture(scope="module")
def world():
    """Keys, the initial model and each site's sealed round-1 update, made once."""
    cfg = preset("fednca")
    model = {n: t.numpy() for n, t in tensors(build(cfg, seed=0)).items()}
    coordinator_keys = CoordinatorKeys.generate()
    site_keys = {s: SiteKeys.generate() for s in SITES}
    base = wire.model_sha256(model)
    rng = np.random.default_rng(7)
    deltas = {s: {n: rng.normal(0, 1e-2, a.shape).astype(np.float32) for n, a in model.items()} for s in SITES}

    def update(site, *, delta=None, signer=None, **fields):
        values = dict(federation=FED, site=site, round=1, base_sha256=base, samples=SAMPLES.get(site, 1), steps=10,
                      partial=False, metrics={"loss": 0.5})  # fmt: skip
        values.update(fields)
        return wire.make_update(**values, delta=deltas[site] if delta is None else delta,
                                signing_key=(signer or site_keys[site]).signing,
                                coordinator_box=coordinator_keys.box.public_key)  # fmt: skip

    updates = {s: update(s) for s in SITES}
    return dict(cfg=cfg, model=model, keys=coordinator_keys, sites=site_keys, deltas=deltas, base=base,
                update=update, updates=updates)  # fmt: skip


def expected_model(world, sites=SITES, method=None):
    """What aggregation must give: the float16 deltas as the sites sent them, combined by the
    federation's aggregation (the default one unless ``method`` names another)."""
    travelled = [({n: a.astype(np.float16).astype(np.float32) for n, a in world["deltas"][s].items()}, SAMPLES[s])
                 for s in sites]  # fmt: skip
    cfg = AggregationConfig() if method is None else AggregationConfig(method=method)
    return aggregate.apply(world["model"], aggregate.aggregate(travelled, cfg))


class Federation:
    """A coordinator, its broker and store, and a client per site, all in this process."""

    def __init__(self, world, root, *, broker=None, config=None, registry=None, hook=None, clock=None):
        self.world = world
        self.broker = broker or MemoryBroker(federation=FED)
        self.clock = clock or Clock()
        self.store = RoundStore(root=root, federation=FED)
        self.config = config or FederationConfig(name=FED, model=world["cfg"], max_rounds=None)
        self.registry = registry or Registry(sites={s: k.verify_key for s, k in world["sites"].items()})
        self.client = self.broker.client(client_id="coordinator")
        self.coordinator = Coordinator(
            config=self.config, store=self.store, keys=world["keys"], registry=self.registry, client=self.client,
            clock=self.clock, initial_model=world["model"], after_action=hook,
        )  # fmt: skip
        self.observer = self.broker.client(client_id="observer")
        self.observer.connect()
        self.observer.subscribe(T.events)
        self.observer.subscribe(T.prefix + "receipts/+")

    def start(self):
        self.coordinator.start()
        return self

    def publish(self, topic, payload):
        sender = self.broker.client(client_id=f"sender-{topic}")
        sender.connect()
        sender.publish(topic, payload).result(1)
        sender.disconnect()

    def send(self, site, payload=None):
        self.publish(T.updates(site), self.world["updates"][site] if payload is None else payload)

    def announcement(self):
        return wire.open_announcement(self.broker.retained(T.round), coordinator_verify_key=self.world["keys"].signing.verify_key,
                                      federation=FED)  # fmt: skip

    def drain(self):
        out = []
        while (m := self.observer.receive()) is not None:
            self.observer.ack(m)
            out.append(m)
        return out

    def receipts(self, messages):
        key = self.world["keys"].signing.verify_key
        return [wire.open_receipt(m.payload, coordinator_verify_key=key, federation=FED, topic_site=m.topic.rsplit("/", 1)[1])
                for m in messages if "/receipts/" in m.topic]  # fmt: skip

    @staticmethod
    def events(messages):
        return [json.loads(m.payload) for m in messages if m.topic == T.events]


def test_round_one_is_announced_signed_and_retained(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    a = fed.announcement()
    assert (a.header.round, a.header.quorum, a.header.deadline) == (1, 2, T0 + 3600)
    assert a.header.model_sha256 == world["base"] == fed.coordinator.model_sha256
    assert a.header.model == world["cfg"]
    opened = fed.events(fed.drain())
    assert opened[0]["kind"] == "round_opened" and opened[0]["enrolled"] == list(SITES)


def test_a_round_closes_when_every_site_reports_with_the_aggregated_model(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    for site in SITES:
        fed.send(site)
    fed.clock.now += 5
    assert fed.coordinator.step() == 3
    assert fed.coordinator.round == 2
    expected = expected_model(world)
    assert fed.coordinator.model_sha256 == wire.model_sha256(expected)
    stored = fed.store.load_model(2)
    for name, value in expected.items():
        np.testing.assert_array_equal(stored[name], value)
    announced = fed.announcement()
    assert announced.header.round == 2 and announced.header.model_sha256 == wire.model_sha256(expected)
    messages = fed.drain()
    assert [(r.site, r.accepted, r.reason) for r in fed.receipts(messages)] == [(s, True, "") for s in SITES]
    kinds = [e["kind"] for e in fed.events(messages)]
    assert kinds == ["round_opened"] + ["update_accepted"] * 3 + ["round_closed", "round_aggregated", "round_opened"]
    summary = next(r for r in fed.store.read_log() if r["kind"] == "round_aggregated")
    assert summary["sites"] == list(SITES) and summary["reason"] == "all_reported" and summary["samples"] == 8
    assert summary["model_sha256"] == wire.model_sha256(expected)
    assert summary["model_bytes"] == fed.store.model_path(2).stat().st_size


def test_quorum_then_grace_closes_the_round(world, tmp_path):
    config = FederationConfig(name=FED, model=world["cfg"], rounds=RoundConfig(grace_s=60), max_rounds=None)
    fed = Federation(world, tmp_path, config=config).start()
    fed.clock.now += 10
    fed.send("a")
    fed.send("c")
    fed.coordinator.step()
    fed.clock.now += 59
    fed.coordinator.step()
    assert fed.coordinator.round == 1
    fed.clock.now += 1
    fed.coordinator.step()
    assert fed.coordinator.round == 2
    assert fed.coordinator.model_sha256 == wire.model_sha256(expected_model(world, ("a", "c")))
    assert fed.store.load_state().round == 2
    assert [r["reason"] for r in fed.store.read_log() if r["kind"] == "round_closed"] == ["grace"]


def test_a_deadline_without_quorum_is_extended_and_announced_again(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    fed.send("a")
    fed.coordinator.step()
    fed.clock.now = T0 + 3600
    fed.coordinator.step()
    state = fed.coordinator.state
    assert (state.round, state.extensions, state.deadline) == (1, 1, T0 + 3600 + 1800)
    assert fed.announcement().header.deadline == T0 + 5400
    extended = [e for e in fed.events(fed.drain()) if e["kind"] == "deadline_extended"]
    assert extended[0]["why"] == "1 of the 2 updates needed had arrived by the deadline"


def test_hostile_messages_neither_stop_the_coordinator_nor_change_the_result(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    update, good = world["update"], world["updates"]
    intruder = SiteKeys.generate()
    flipped = bytearray(good["a"])
    flipped[len(flipped) // 2] ^= 1
    hostile = [
        (T.updates("a"), b"garbage"),
        (T.updates("a"), b""),
        (T.updates("a"), good["a"][:100]),
        (T.updates("a"), bytes(flipped)),
        (T.updates("a"), bytes(50_000)),  # over the update size limit
        (T.updates("c"), good["b"]),  # b's update published as c's
        (T.updates("a"), update("a", signer=intruder)),  # forged: a's name, another key
        (T.updates("a"), update("a", round=7)),
        (T.updates("a"), update("a", base_sha256="e" * 64)),
        (T.updates("a"), update("a", federation="other")),
        (T.updates("zz"), update("a")),  # a site that is not enrolled
        (T.prefix + "updates/Bad", good["a"]),  # no valid site id: cannot be attributed
        (T.prefix + "status/Bad", b"{}"),
        ("fednca/other/updates/a", good["a"]),  # not subscribed: never delivered
        (T.updates("a") + "/extra", good["a"]),
        (T.status("a"), b"\xff\xfe not json"),
    ]
    for topic, payload in hostile[:8]:
        fed.publish(topic, payload)
    fed.send("a")
    fed.send("a")  # a replay of an accepted update
    for topic, payload in hostile[8:]:
        fed.publish(topic, payload)
    fed.coordinator.step()
    assert fed.coordinator.round == 1
    fed.send("b")
    fed.send("c")
    fed.coordinator.step()
    assert fed.coordinator.round == 2
    assert [r["sites"] for r in fed.store.read_log() if r["kind"] == "round_aggregated"] == [list(SITES)]
    assert fed.coordinator.model_sha256 == wire.model_sha256(expected_model(world))
    fed.send("a")  # a late replay of round 1
    fed.coordinator.step()
    messages = fed.drain()
    verdicts = [(r.site, r.reason or "accepted") for r in fed.receipts(messages)]
    assert verdicts == [
        ("a", "malformed"), ("a", "malformed"), ("a", "bad_seal"), ("a", "bad_seal"), ("a", "too_large"),
        ("c", "site_mismatch"), ("a", "wrong_key"), ("a", "unknown_round"), ("a", "accepted"), ("a", "accepted"),
        ("a", "wrong_base_model"), ("a", "wrong_federation"), ("zz", "unknown_site"),
        ("b", "accepted"), ("c", "accepted"), ("a", "stale_round"),
    ]  # fmt: skip
    assert fed.receipts(messages)[0].update_id == NO_UPDATE_ID
    dropped = [e["topic"] for e in fed.events(messages) if e["kind"] == "message_dropped"]
    assert dropped == [T.prefix + "updates/Bad", T.prefix + "status/Bad"]
    assert fed.broker.queued("coordinator") == 0  # everything was acknowledged
    assert fed.coordinator.statuses == {}


def test_a_restart_resumes_the_open_round(world, tmp_path):
    broker = MemoryBroker(federation=FED)
    first = Federation(world, tmp_path, broker=broker).start()
    first.send("a")
    first.coordinator.step()
    first.client.kill()
    second = Federation(world, tmp_path, broker=broker, clock=first.clock).start()
    assert [a.site for a in second.coordinator.state.accepted] == ["a"]
    second.send("b")
    second.send("c")
    second.coordinator.step()
    assert second.coordinator.model_sha256 == wire.model_sha256(expected_model(world))
    assert second.announcement().header.round == 2


def _run_with_crash(world, root, broker, crash_at):
    """Run round 1 with a hook that crashes at action number ``crash_at``; True if it crashed."""
    count = [0]

    def hook(name):
        count[0] += 1
        if count[0] == crash_at:
            raise Crash(name)

    fed = Federation(world, root, broker=broker, hook=hook)
    crashed = False
    try:
        fed.start()
    except Crash:
        crashed = True
    for site in SITES:  # the sites publish whatever the coordinator is doing
        fed.send(site)
    if not crashed:
        try:
            fed.coordinator.run_until(lambda c: c.round == 2, poll=0, max_steps=5)
        except Crash:
            crashed = True
    if crashed:
        fed.client.kill()
        return True, fed.clock
    return False, count[0]


def test_a_crash_after_any_action_loses_no_update_and_counts_none_twice(world, tmp_path):
    crashed, actions = _run_with_crash(world, tmp_path / "whole", MemoryBroker(federation=FED), 0)
    assert not crashed and actions == 24  # every action of opening, one round of three updates and closing
    expected = wire.model_sha256(expected_model(world))
    for crash_at in range(1, actions + 1):
        broker = MemoryBroker(federation=FED)
        crashed, clock = _run_with_crash(world, tmp_path / str(crash_at), broker, crash_at)
        assert crashed
        fed = Federation(world, tmp_path / str(crash_at), broker=broker, clock=clock).start()
        assert fed.coordinator.run_until(lambda c: c.round == 2, poll=0, max_steps=5), f"crash at action {crash_at}"
        closed = [r for r in fed.store.read_log() if r["kind"] == "round_aggregated"]
        assert [r["sites"] for r in closed] == [list(SITES)], f"crash at action {crash_at}"
        log = fed.store.read_log()  # every line a crash kept out is written on the restart
        assert sorted(r["site"] for r in log if r["kind"] == "update_accepted") == sorted(SITES), f"crash at {crash_at}"
        assert [r["sites"] for r in log if r["kind"] == "round_closed"] == [list(SITES)], f"crash at {crash_at}"
        assert fed.coordinator.model_sha256 == expected, f"crash at action {crash_at}"
        assert fed.announcement().header.round == 2


def test_robust_aggregation_is_used_when_configured(world, tmp_path):
    config = FederationConfig(name=FED, model=world["cfg"], aggregation=AggregationConfig(method="median"),
                              max_rounds=None)  # fmt: skip
    fed = Federation(world, tmp_path, config=config).start()
    for site in SITES:
        fed.send(site)
    fed.coordinator.step()
    assert fed.coordinator.model_sha256 == wire.model_sha256(expected_model(world, method="median"))


def test_the_federation_finishes_after_max_rounds_with_a_final_announcement(world, tmp_path):
    config = FederationConfig(name=FED, model=world["cfg"], max_rounds=1)
    fed = Federation(world, tmp_path, config=config).start()
    for site in SITES:
        fed.send(site)
    assert fed.coordinator.run_until(poll=0, max_steps=3)
    final = fed.announcement()
    assert final.header.round == 2 and final.header.deadline <= fed.clock.now
    assert final.header.model_sha256 == wire.model_sha256(expected_model(world))
    assert fed.events(fed.drain())[-1]["kind"] == "federation_finished"
    assert fed.store.load_state().status == "closed"
    again = Federation(world, tmp_path, config=config).start()  # a restart stays finished
    assert again.coordinator.finished and again.announcement().header.round == 2
    assert [r["kind"] for r in again.store.read_log()].count("federation_finished") == 1


def test_status_keeps_the_last_json_object_of_each_enrolled_site(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    fed.publish(T.status("a"), b'{"state": "training", "round": 1}')
    fed.publish(T.status("a"), b'{"state": "idle"}')
    fed.publish(T.status("b"), b"[1, 2]")
    fed.publish(T.status("c"), b'{"pad": "' + b"x" * 5000 + b'"}')
    fed.publish(T.status("zz"), b'{"state": "idle"}')
    fed.coordinator.step()
    statuses = fed.coordinator.statuses
    assert list(statuses) == ["a"] and statuses["a"].telemetry == {"state": "idle"}
    assert statuses["a"].received_at == T0
    assert fed.broker.queued("coordinator") == 0


def test_revoking_a_site_mid_round_refuses_its_updates(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    fed.send("c")
    fed.coordinator.step()
    fed.coordinator.set_registry(Registry(sites={s: world["sites"][s].verify_key for s in ("a", "b")}))
    assert fed.coordinator.state.enrolled == {"a", "b"} and fed.coordinator.state.accepted == ()
    fed.send("c")
    fed.send("a")
    fed.send("b")
    fed.coordinator.step()
    assert fed.coordinator.model_sha256 == wire.model_sha256(expected_model(world, ("a", "b")))
    verdicts = [(r.site, r.reason) for r in fed.receipts(fed.drain())]
    assert verdicts == [("c", ""), ("c", "unknown_site"), ("a", ""), ("b", "")]


def test_a_site_enrolled_again_with_a_new_key_loses_what_its_old_key_signed(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    fed.send("c")
    fed.coordinator.step()
    assert [a.site for a in fed.coordinator.state.accepted] == ["c"]
    rekeyed = {s: k.verify_key for s, k in world["sites"].items()}
    rekeyed["c"] = SiteKeys.generate().verify_key
    fed.coordinator.set_registry(Registry(sites=rekeyed))
    assert fed.coordinator.state.accepted == () and "c" in fed.coordinator.state.enrolled
    for site in ("a", "b"):
        fed.send(site)
    fed.coordinator.step()
    fed.clock.now += 600  # past the grace period: the round closes and aggregates without raising
    fed.coordinator.step()
    assert fed.coordinator.round == 2
    assert fed.coordinator.model_sha256 == wire.model_sha256(expected_model(world, ("a", "b")))


def test_it_runs_under_the_federation_acl(world, tmp_path):
    broker = MemoryBroker(federation=FED)
    broker.add_user("coordinator", password="pw", role=COORDINATOR)
    for site in SITES:
        broker.add_user(site, password=f"{site}-pw", role=SITE)
    client = broker.client(client_id="coordinator", username="coordinator", password="pw")
    store = RoundStore(root=tmp_path, federation=FED)
    coordinator = Coordinator(
        config=FederationConfig(name=FED, model=world["cfg"]), store=store, keys=world["keys"],
        registry=Registry(sites={s: k.verify_key for s, k in world["sites"].items()}), client=client, clock=Clock(),
        initial_model=world["model"],
    )  # fmt: skip
    coordinator.start()
    sites = {}
    for site in SITES:
        sites[site] = broker.client(client_id=site, username=site, password=f"{site}-pw")
        sites[site].connect()
        sites[site].subscribe(T.receipts(site))
        sites[site].publish(T.updates(site), world["updates"][site]).result(1)
    coordinator.step()
    assert coordinator.round == 2
    for site, client in sites.items():
        receipt = client.receive()
        assert wire.open_receipt(receipt.payload, coordinator_verify_key=world["keys"].signing.verify_key,
                                 federation=FED, topic_site=site).accepted  # fmt: skip


def test_it_must_be_started_once_before_stepping(world, tmp_path):
    fed = Federation(world, tmp_path)
    with pytest.raises(CoordinatorError, match="start"):
        fed.coordinator.step()
    fed.start()
    with pytest.raises(CoordinatorError, match="already"):
        fed.coordinator.start()


def test_without_a_model_it_starts_from_the_configured_preset_and_seed(world, tmp_path):
    config = FederationConfig(name=FED, model=world["cfg"], seed=3)
    coordinator = Coordinator(
        config=config, store=RoundStore(root=tmp_path, federation=FED), keys=world["keys"],
        registry=Registry(), client=MemoryBroker(federation=FED).client(client_id="coordinator"), clock=Clock(),
    )  # fmt: skip
    coordinator.start()
    built = {n: t.numpy() for n, t in tensors(build(world["cfg"], seed=3)).items()}
    assert coordinator.model_sha256 == wire.model_sha256(built) != world["base"]
    assert coordinator.state.enrolled == frozenset() and coordinator.state.quorum == 1


# -- a poisoned aggregate, and rolling back ------------------------------------------------------


def test_an_aggregate_that_fails_the_gate_keeps_the_previous_model_and_says_why(world, tmp_path):
    unbounded = AggregationConfig(method="fedavg", median_norm_factor=None, max_weight_ratio=None)
    config = FederationConfig(name=FED, model=world["cfg"], aggregation=unbounded, max_rounds=None)
    fed = Federation(world, tmp_path, config=config).start()
    huge = {n: np.full(a.shape, 6e4, np.float32) for n, a in world["model"].items()}  # finite in float16
    fed.send("a", world["update"]("a", delta=huge))
    for site in ("b", "c"):
        fed.send(site)
    fed.clock.now += 5
    assert fed.coordinator.step() == 3
    assert fed.coordinator.round == 2  # the round closed and the next one opened
    assert fed.coordinator.model_sha256 == world["base"]  # on the model the federation had
    assert fed.announcement().header.model_sha256 == world["base"]
    summary = next(r for r in fed.store.read_log() if r["kind"] == "round_aggregated")
    assert "max_model_change" in summary["model_kept"]


def test_rollback_opens_a_new_round_on_an_earlier_model_that_a_restart_announces(world, tmp_path):
    from fednca_broker.rollback import roll_back
    from fednca_broker.store import StoreError

    fed = Federation(world, tmp_path).start()
    for site in SITES:
        fed.send(site)
    fed.clock.now += 5
    fed.coordinator.step()
    assert fed.coordinator.round == 2 and fed.coordinator.model_sha256 != world["base"]
    fed.send("a", world["update"]("a", round=2, base_sha256=fed.coordinator.model_sha256))
    fed.coordinator.step()
    fed.coordinator.stop()
    with pytest.raises(StoreError, match=r"no stored model of that round \(stored: 1, 2\)"):
        roll_back(store=fed.store, to_round=7, enrolled=frozenset(SITES), config=RoundConfig(), now=fed.clock.now)
    with fed.store.lock(), pytest.raises(StoreError, match="running coordinator"):
        with fed.store.lock():
            pass
    done = roll_back(store=fed.store, to_round=1, enrolled=frozenset(SITES), config=RoundConfig(), now=fed.clock.now)
    assert (done.round, done.model_sha256, done.abandoned) == (3, world["base"], 1)
    again = Federation(world, tmp_path, broker=fed.broker, clock=fed.clock).start()
    assert (again.coordinator.round, again.coordinator.model_sha256) == (3, world["base"])
    announced = again.announcement()
    assert (announced.header.round, announced.header.model_sha256) == (3, world["base"])
    kinds = [r["kind"] for r in again.store.read_log()]
    assert kinds[-2:] == ["model_rolled_back", "round_opened"]
