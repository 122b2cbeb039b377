"""Secure aggregation through the coordinator on the in-memory broker, with a fake clock: the model
equals plaintext FedAvg within the fixed-point bound, with dropouts at each phase, across a
coordinator crash during the unmasking; and neither the store nor the broker holds one update."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fednca import wire
from fednca.aggregate import AggregationConfig
from fednca.aggregate_rows import flatten, layout_of
from fednca.config import preset
from fednca.fixedpoint import clip, decode_mean, error_bound
from fednca.keys import CoordinatorKeys, Registry, SiteKeys
from fednca.model import build, tensors
from fednca.round_keys import RoundKeyBook, make_batch, write_book
from fednca.secagg import self_mask
from fednca.secagg_round import answer_request, mask_delta
from fednca.topics import Topics
from fednca.transport.memory import MemoryBroker
from fednca.wire_secagg import make_masked_update, make_unmask_answer, open_unmask_request
from fednca_broker.config import FederationConfig
from fednca_broker.coordinator import Coordinator
from fednca_broker.rounds import RoundConfig
from fednca_broker.secure_config import SecureAggregationConfig
from fednca_broker.secure_rounds import ROUND_KEY_BOOK
from fednca_broker.store import RoundStore

FED = "fed"
T0 = 1_800_000_000.0
SITES = ("a", "b", "c", "d")
SAMPLES = {"a": 30, "b": 70, "c": 250, "d": 120}  # c's weight is capped at max_weight 200
T = Topics(FED)
SECURE = SecureAggregationConfig(enabled=True, bound=0.05, max_weight=200, threshold=2, unmask_timeout_s=600)
PLAIN_RULES = AggregationConfig(method="fedavg", clip_norm=None, median_norm_factor=None, max_weight_ratio=None)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def world():
    cfg = preset("fednca")
    model = {n: t.numpy() for n, t in tensors(build(cfg, seed=0)).items()}
    rng = np.random.default_rng(3)
    deltas = {s: {n: rng.normal(0, 0.02, a.shape).astype(np.float32) for n, a in model.items()} for s in SITES}
    return dict(cfg=cfg, model=model, keys=CoordinatorKeys.generate(), deltas=deltas,
                sites={s: SiteKeys.generate() for s in SITES})


class Site:
    """A site's secure-aggregation side, as the daemon does it (without training)."""

    def __init__(self, name: str, world, rand) -> None:
        self.name, self.world, self.rand = name, world, rand
        self.signing = world["sites"][name].signing
        self.secrets, self.public = make_batch(site=name, signing_key=self.signing, start=0, count=4, rand=rand)
        self.self_seed: bytes | None = None
        self.params = None

    def masked_update(self, announcement) -> bytes:
        h = announcement.header
        self.params = h.secagg
        entry = self.params.entry(self.name)
        row = flatten(self.world["deltas"][self.name], layout_of({k: v.shape for k, v in self.world["model"].items()}))
        self.self_seed = self.rand(32)
        self.secret = self.secrets[entry.key_index]
        m = mask_delta(row, site=self.name, samples=SAMPLES[self.name], params=self.params, round_secret=self.secret,
                       self_seed=self.self_seed, federation=FED, round_no=h.round, rand=self.rand)
        return make_masked_update(federation=FED, site=self.name, round=h.round, base_sha256=h.model_sha256,
                                  samples=SAMPLES[self.name], steps=3, partial=False, metrics={}, weight=m.weight,
                                  key_index=entry.key_index, masked=m.masked, shares=m.shares, refill=(),
                                  signing_key=self.signing, coordinator_box=self.world["keys"].box.public_key)

    def answer(self, payload: bytes) -> bytes:
        request = open_unmask_request(payload, coordinator_verify_key=self.world["keys"].signing.verify_key,
                                      federation=FED, site=self.name)
        a = answer_request(request, site=self.name, params=self.params, round_secret=self.secret,
                           self_seed=self.self_seed, federation=FED)
        return make_unmask_answer(federation=FED, site=self.name, round=request.round, self_seed=a.self_seed,
                                  shares=a.shares, pair_seeds=a.pair_seeds, signing_key=self.signing,
                                  coordinator_box=self.world["keys"].box.public_key)


class Federation:
    def __init__(self, world, root, *, broker=None, clock=None, sites=None) -> None:
        self.world, self.root = world, root
        self.broker = broker or MemoryBroker(federation=FED)
        self.clock = clock or Clock()
        self.store = RoundStore(root=root, federation=FED)
        self.registry = Registry(sites={s: k.verify_key for s, k in world["sites"].items()})
        rand = random.Random(11)
        self.sites = sites or {s: Site(s, world, lambda n: bytes(rand.getrandbits(8) for _ in range(n))) for s in SITES}
        if sites is None:
            book = RoundKeyBook().add([k for s in self.sites.values() for k in s.public], self.registry)
            write_book(self.store.folder / ROUND_KEY_BOOK, book)
        self.config = FederationConfig(name=FED, model=world["cfg"], max_rounds=None, aggregation=PLAIN_RULES,
                                       secure_aggregation=SECURE, rounds=RoundConfig(quorum_count=2, grace_s=60))
        self.coordinator = Coordinator(config=self.config, store=self.store, keys=world["keys"], registry=self.registry,
                                       client=self.broker.client(client_id="coordinator"), clock=self.clock,
                                       initial_model=world["model"])
        self.spy = self.broker.client(client_id="spy")  # everything the broker carries
        self.spy.connect()
        self.spy.subscribe(T.prefix + "#")
        self.carried: list = []  # (topic, payload)
        self.inbox = {s: self.broker.client(client_id=f"inbox-{s}") for s in SITES}
        for s, c in self.inbox.items():
            c.connect()
            c.subscribe(T.receipts(s))

    def announcement(self):
        return wire.open_announcement(self.broker.retained(T.round), federation=FED,
                                      coordinator_verify_key=self.world["keys"].signing.verify_key)

    def send(self, site, payload) -> None:
        c = self.broker.client(client_id=f"send-{site}")
        c.connect()
        c.publish(T.updates(site), payload).result(1)
        c.disconnect()

    def requests(self, site) -> list[bytes]:
        out = []
        while (m := self.inbox[site].receive()) is not None:
            self.inbox[site].ack(m)
            if m.payload[5:6] == b"Q":
                out.append(m.payload)
        return out

    def step(self) -> None:
        self.coordinator.step()
        while (m := self.spy.receive()) is not None:
            self.spy.ack(m)
            self.carried.append((m.topic, m.payload))


def fedavg(world, sites, model):
    """Plaintext FedAvg of the clipped deltas with weights min(samples, 200), applied in float32."""
    w = np.array([min(SAMPLES[s], 200) for s in sites], dtype=np.float64)
    out = {}
    for name, base in model.items():
        mean = sum(wi * clip(world["deltas"][s][name], SECURE_FP()) for wi, s in zip(w, sites)) / w.sum()
        out[name] = (base + mean.astype(np.float32)).astype(np.float32)
    return out


def SECURE_FP():
    from fednca.fixedpoint import FixedPoint

    return FixedPoint(bound=SECURE.bound, frac_bits=SECURE.frac_bits_for(len(SITES)))


def assert_fedavg(world, fed, sites):
    want = fedavg(world, sites, world["model"])
    bound = error_bound(SECURE_FP())
    worst = max(float(np.max(np.abs(fed.coordinator.model[n] - want[n]))) for n in want)
    # fixed point: 2^-(f+1) per value (f = 23 here: 6.0e-8, 1.2e-6 of the bound 0.05), plus float32 rounding
    assert worst <= bound + 1e-6, worst
    return worst


def run_round(fed, *, senders, answering, late=()):
    ann = fed.announcement()
    assert ann.header.secagg is not None and [e.site for e in ann.header.secagg.roster] == list(SITES)
    for s in senders:
        fed.send(s, fed.sites[s].masked_update(ann))
    fed.step()
    if len(senders) < len(SITES):
        fed.clock.now += 61  # the grace after quorum: the round closes without the others
        fed.step()
    for s in late:
        fed.send(s, fed.sites[s].masked_update(ann))
    fed.step()
    for s in answering:
        for request in fed.requests(s)[:1]:
            fed.send(s, fed.sites[s].answer(request))
    fed.step()
    return ann


def test_secure_round_equals_fedavg_and_the_next_round_opens(world, tmp_path):
    fed = Federation(world, tmp_path)
    fed.coordinator.start()
    fed.step()
    run_round(fed, senders=SITES, answering=SITES)
    assert fed.coordinator.round == 2
    assert_fedavg(world, fed, SITES)
    nxt = fed.announcement().header.secagg
    assert [e.key_index for e in nxt.roster] == [1, 1, 1, 1]  # a new round key for every site


def test_a_missing_site_is_left_out_and_its_late_update_refused(world, tmp_path):
    fed = Federation(world, tmp_path)
    fed.coordinator.start()
    fed.step()
    run_round(fed, senders=("a", "b", "c"), answering=("a", "b", "c"), late=("d",))
    assert fed.coordinator.round == 2
    assert_fedavg(world, fed, ("a", "b", "c"))
    receipts = [wire.open_receipt(p, coordinator_verify_key=world["keys"].signing.verify_key, federation=FED,
                                  topic_site="d") for t, p in fed.carried if t == T.receipts("d") and p[5:6] == b"R"]
    assert [(r.accepted, r.reason) for r in receipts] == [(False, "round_closed")]


def test_a_site_killed_between_masking_and_answering_is_rebuilt_from_shares(world, tmp_path):
    fed = Federation(world, tmp_path)
    fed.coordinator.start()
    fed.step()
    run_round(fed, senders=SITES, answering=("a", "b", "d"))  # c masked, then died
    assert fed.coordinator.round == 2
    assert_fedavg(world, fed, SITES)


def test_silent_survivor_with_a_missing_site_gives_the_round_up_at_the_unmask_deadline(world, tmp_path):
    fed = Federation(world, tmp_path)
    fed.coordinator.start()
    fed.step()
    run_round(fed, senders=("a", "b", "c"), answering=("a", "b"))
    assert fed.coordinator.round == 1  # waiting for c
    fed.clock.now += SECURE.unmask_timeout_s + 1
    fed.step()
    assert fed.coordinator.round == 2
    assert all(np.array_equal(fed.coordinator.model[n], world["model"][n]) for n in world["model"])


def test_a_coordinator_killed_during_the_unmasking_resumes_it(world, tmp_path):
    fed = Federation(world, tmp_path)
    fed.coordinator.start()
    fed.step()
    ann = fed.announcement()
    for s in ("a", "b", "c"):
        fed.send(s, fed.sites[s].masked_update(ann))
    fed.step()
    fed.clock.now += 61
    fed.step()
    fed.send("a", fed.sites["a"].answer(fed.requests("a")[0]))
    fed.step()
    pending = {s: fed.requests(s) for s in ("b", "c")}
    fed.coordinator.close()  # killed: the object is dropped, a new one starts on the same store
    again = Federation(world, tmp_path, broker=fed.broker, clock=fed.clock, sites=fed.sites)
    again.coordinator.start()
    assert again.coordinator.round == 1
    again.step()
    for s in ("b", "c"):
        requests = again.requests(s) or pending[s]  # asked again at the restart
        again.send(s, fed.sites[s].answer(requests[0]))
    again.step()
    assert again.coordinator.round == 2
    assert_fedavg(world, again, ("a", "b", "c"))


def test_neither_the_store_nor_the_broker_holds_a_single_update(world, tmp_path):
    fed = Federation(world, tmp_path)
    fed.coordinator.start()
    fed.step()
    run_round(fed, senders=SITES, answering=SITES)
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    carried = b"".join(p for _, p in fed.carried)
    for s in SITES:
        for name in sorted(world["model"])[:4]:
            for dtype in (np.float16, np.float32):
                raw = world["deltas"][s][name].astype(dtype).reshape(-1)[:16].tobytes()
                assert raw not in stored and raw not in carried
    # What the coordinator holds of site a: its masked vector and its self-mask seed (from its answer).
    # Removing the self-mask leaves a's update under its pairwise masks: uniform noise, not the delta.
    from fednca.wire_secagg import verify_masked, open_unmask_answer

    state = fed.store.read_log()
    path = next(p for p in (tmp_path / FED / "rounds" / "1").glob("a-*.bin"))
    masked = verify_masked(path.read_bytes(), topic_site="a", coordinator_keys=world["keys"].box,
                           registry=fed.registry).masked
    answer = open_unmask_answer((tmp_path / FED / "secagg" / "1" / "answers" / "a.bin").read_bytes(), topic_site="a",
                                coordinator_keys=world["keys"].box, registry=fed.registry, federation=FED)
    fp = SECURE_FP()
    guess = decode_mean(masked - self_mask(answer.self_seed, length=masked.shape[0], fp=fp), total_weight=30, fp=fp)
    truth = clip(flatten(world["deltas"]["a"], layout_of({k: v.shape for k, v in world["model"].items()})), fp)
    # a right decode is within the bound 0.05 of the truth; this one is uniform over the ring's range
    assert state and float(np.mean(np.abs(guess - truth))) > 10 * SECURE.bound
    assert abs(float(np.corrcoef(guess, truth)[0, 1])) < 0.1


def test_config_turns_it_on_and_refuses_rules_that_need_single_updates(tmp_path):
    from fednca.errors import ConfigError
    from fednca_broker.config import parse_config

    base = {"federation": FED, "aggregation": {"method": "fedavg", "clip_norm": None, "median_norm_factor": None,
                                               "max_weight_ratio": None}}
    on = parse_config({**base, "secure_aggregation": True}, folder=tmp_path)  # YAML's `on`
    assert on.federation.secure_aggregation.enabled and on.federation.secure_aggregation.bound == 0.5
    assert not parse_config({"federation": FED}, folder=tmp_path).federation.secure_aggregation.enabled
    tuned = parse_config({**base, "secure_aggregation": {"bound": 0.1, "threshold": 3}}, folder=tmp_path)
    assert tuned.federation.secure_aggregation.threshold == 3 and tuned.federation.secure_aggregation.enabled
    with pytest.raises(ConfigError) as e:
        parse_config({"federation": FED, "secure_aggregation": True}, folder=tmp_path)  # trimmed mean by default
    keys = [k for k, _ in e.value.problems]
    assert "aggregation.method" in keys and "aggregation.median_norm_factor" in keys
    with pytest.raises(ConfigError, match="round.mode"):
        parse_config({**base, "secure_aggregation": True, "round": {"mode": "async"}}, folder=tmp_path)
    with pytest.raises(ConfigError, match="secure_aggregation.bogus"):
        parse_config({**base, "secure_aggregation": {"bogus": 1}}, folder=tmp_path)
    with pytest.raises(ConfigError, match="secure_aggregation.threshold"):  # one answer would open a lone survivor
        parse_config({**base, "secure_aggregation": {"threshold": 1}}, folder=tmp_path)


def test_a_masked_update_for_a_round_without_a_roster_is_refused(world, tmp_path):
    # No site handed over round keys: round 1 is announced without secagg. A masked update that a
    # site made up anyway must not be counted (nothing could unmask it at the close).
    from types import SimpleNamespace

    from fednca.secagg_params import RosterEntry, SecureParams
    from nacl.bindings import crypto_scalarmult_base

    rand = random.Random(5)
    sites = {s: Site(s, world, lambda n: bytes(rand.getrandbits(8) for _ in range(n))) for s in SITES}
    fed = Federation(world, tmp_path, sites=sites)
    fed.coordinator.start()
    fed.step()
    ann = fed.announcement()
    assert ann.header.secagg is None
    roster = tuple(RosterEntry(site=s, x=i + 1, key_index=0, public=crypto_scalarmult_base(sites[s].secrets[0]))
                   for i, s in enumerate(SITES))
    made_up = SecureParams(fixed_point=SECURE_FP(), max_weight=200, threshold=2, roster=roster)
    fake = SimpleNamespace(header=SimpleNamespace(secagg=made_up, round=ann.header.round,
                                                  model_sha256=ann.header.model_sha256))
    fed.send("a", sites["a"].masked_update(fake))
    fed.step()
    assert len(fed.coordinator.state.accepted) == 0


def test_one_sites_refused_refill_does_not_cost_the_others_theirs(world, tmp_path):
    from types import SimpleNamespace

    from fednca.round_keys import read_book
    from fednca_broker.secure_rounds import SecureRounds

    rand = random.Random(9)
    r = lambda n: bytes(rand.getrandbits(8) for _ in range(n))  # noqa: E731
    _, keys_a = make_batch(site="a", signing_key=world["sites"]["a"].signing, start=0, count=2, rand=r)
    _, keys_b = make_batch(site="b", signing_key=world["sites"]["b"].signing, start=0, count=2, rand=r)
    registry = Registry(sites={"a": world["sites"]["a"].verify_key})  # b was revoked since its update
    store = RoundStore(root=tmp_path, federation=FED)
    secure = SecureRounds(config=SECURE, federation=FED, store=store, keys=world["keys"],
                          book_path=tmp_path / "book.json", client=None, clock=Clock())  # type: ignore[arg-type]
    secure._updates = {"a": SimpleNamespace(refill=tuple(keys_a)), "b": SimpleNamespace(refill=tuple(keys_b))}
    secure._take_refills(registry)
    assert read_book(tmp_path / "book.json").unused("a") == 2
