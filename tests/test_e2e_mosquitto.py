"""A federation of real processes on a real mosquitto: a full run under attack, and faults during rounds.

Each test sets a federation up as ``fednca demo --broker`` does (coordinator folder, enrolled sites,
the generated mosquitto.conf, password file and ACL), with a tiny model (16x16 input, NCA steps 3
and 2, 8 phantom images per site, batch 2), then runs mosquitto, ``fednca coordinator run`` and one
``fednca daemon`` per site as separate process groups. Every run ends with :func:`check_rounds`:
every round completed, each round's stored and announced model equal to FedAvg recomputed here from
the payloads of the updates the round log lists as accepted, no site counted twice in a round, and
no outbox left holding an update. docs/faults.md says what each fault shows.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from e2e_support import FEDERATION, Federation, wait_until
from fednca import aggregate, wire
from fednca.aggregate import AggregationConfig
from fednca.keys import read_coordinator_keys, read_coordinator_public, read_registry, read_site_keys
from fednca_broker.coordinator import NO_UPDATE_ID
from fednca_daemon.telemetry import OFFLINE
from mosquitto_fixture import MOSQUITTO

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]

ROUND_TIMEOUT = 120.0  # one round of three tiny trainers on two busy cores takes ~10 s: a bound only
NOT_AUTHORIZED = 135  # MQTT v5 PUBACK reason code of a publish the ACL denies
T = f"fednca/{FEDERATION}/"
STORED = r"round {round}: update (\w+) stored"  # the daemon's log line, with the update id's first 8 digits


@pytest.fixture
def running(tmp_path):
    """Makes one federation; stops every process and client it started."""
    made: list[Federation] = []

    def make(**settings) -> Federation:
        made.append(Federation(root=tmp_path / f"federation{len(made)}", **settings))
        return made[-1]

    yield make
    for fed in made:
        fed.close()


def _accepted(fed: Federation, site: str, rnd: int) -> str | None:
    ids = [r["update_id"] for r in fed.records("update_accepted") if (r["site"], r["round"]) == (site, rnd)]
    return ids[0] if ids else None


def _finish(fed: Federation) -> None:
    """Wait for the coordinator to finish the federation, then stop the daemons (each exits 0)."""
    wait_until(lambda: fed.returncode("coordinator") == 0, timeout=3 * ROUND_TIMEOUT,
               what="the coordinator to finish the federation", federation=fed)
    for site in fed.sites:
        assert fed.stop(site) == 0, fed.tails(site)


def _forged_update(fed: Federation, *, site: str, rnd: int, base: dict, update_id: str) -> bytes:
    """An update signed with ``site``'s own key and sealed to the coordinator, as a compromised device
    could make one."""
    rng = np.random.default_rng(rnd)
    delta = {name: rng.normal(0, 1e-3, value.shape).astype(np.float32) for name, value in base.items()}
    return wire.make_update(
        federation=FEDERATION, site=site, round=rnd, base_sha256=wire.model_sha256(base), samples=8, steps=4,
        partial=False, metrics={}, delta=delta, signing_key=read_site_keys(fed.site_paths[site].keys).signing,
        coordinator_box=read_coordinator_public(fed.cfg.keys_dir).box, update_id=update_id)  # fmt: skip


# -- what every run must end with ---------------------------------------------------------------------


def announcements(fed: Federation, messages: list) -> list:
    """The signed round announcements among ``messages``, opened and verified."""
    key = read_coordinator_public(fed.cfg.keys_dir).verify
    topic = f"fednca/{FEDERATION}/round"
    return [wire.open_announcement(m.payload, coordinator_verify_key=key, federation=FEDERATION)
            for m in messages if m.topic == topic and m.payload]


def receipts(fed: Federation, messages: list, site: str) -> list:
    """The signed receipts for ``site`` among ``messages``, opened and verified."""
    key = read_coordinator_public(fed.cfg.keys_dir).verify
    topic = f"fednca/{FEDERATION}/receipts/{site}"
    return [wire.open_receipt(m.payload, coordinator_verify_key=key, federation=FEDERATION, topic_site=site)
            for m in messages if m.topic == topic]


def check_rounds(fed: Federation, *, rounds: int, published: list) -> dict[int, list[str]]:
    """Every round completed; each round's stored and published model equal to FedAvg recomputed
    here from the payloads of the updates its ``update_accepted`` lines name; no (site, round)
    accepted twice and no accepted payload missing. Returns the sites counted in each round."""
    keys = read_coordinator_keys(fed.cfg.keys_dir)
    registry = read_registry(fed.cfg.registry_path)
    log = fed.records()
    accepted = [r for r in log if r["kind"] == "update_accepted"]
    pairs = [(r["site"], r["round"]) for r in accepted]
    assert len(pairs) == len(set(pairs)), f"a site counted twice in a round: {sorted(pairs)}"
    closed = {r["round"]: r for r in log if r["kind"] == "round_aggregated"}
    assert sorted(closed) == list(range(1, rounds + 1)), f"rounds aggregated: {sorted(closed)}"
    finished = [r["round"] for r in log if r["kind"] == "federation_finished"]
    assert finished == [rounds], f"federation_finished lines: {finished}"
    state = fed.store.load_state()
    assert (state.round, state.status) == (rounds, "closed")

    model = fed.store.load_model(1)
    shas = {a.header.round: set() for a in published}
    for a in published:
        shas[a.header.round].add(a.header.model_sha256)
    assert shas.get(1) == {wire.model_sha256(model)}, f"round 1 was announced with models {shas.get(1)}"
    counted = {}
    for rnd in range(1, rounds + 1):
        entries = [r for r in accepted if r["round"] == rnd]
        sites = [r["site"] for r in entries]
        assert sites == closed[rnd]["sites"], f"round {rnd}: log accepted {sites}, aggregated {closed[rnd]['sites']}"
        base = wire.model_sha256(model)
        shapes = {name: value.shape for name, value in model.items()}
        updates = []
        for r in entries:
            payload = fed.store.read_update(rnd, r["site"], r["update_id"])  # StoreError when missing
            update = wire.open_update(payload, topic_site=r["site"], coordinator_keys=[keys.box], registry=registry,
                                      federation=FEDERATION, round=rnd, base_sha256=base, shapes=shapes)
            assert (update.header.update_id, update.header.samples) == (r["update_id"], r["samples"])
            updates.append((update.delta, r["samples"]))
        expected = aggregate.apply(model, aggregate.aggregate(updates, AggregationConfig()))  # init's default
        stored = fed.store.load_model(rnd + 1)
        assert sorted(stored) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(stored[name], value, err_msg=f"round {rnd}: stored model, tensor {name}")
        sha = wire.model_sha256(expected)
        assert closed[rnd]["model_sha256"] == sha, f"round {rnd}: the log names another model"
        assert shas.get(rnd + 1) == {sha}, f"round {rnd + 1} was announced with {shas.get(rnd + 1)}, expected {sha}"
        counted[rnd] = sites
        model = expected
    for site in fed.sites:
        left = sorted(p.name for p in (fed.state_dir(site) / "outbox").glob("*.update"))
        assert not left, f"{site}: updates left in the outbox: {left}"
    return counted


def test_a_full_run_where_the_broker_refuses_forgery_and_the_coordinator_counts_duplicates_and_garbage_right(running):
    fed = running(sites=3, rounds=2, quorum=2, grace=2.0)
    probe = fed.enroll("probe")  # an enrolled device's account that only listens, besides the three sites
    fed.start_broker()
    watch = fed.observe(["round"])
    snoop = fed.listener(probe, "e2e-snoop-probe", ["#", "updates/site1", "updates/+", "receipts/site1"])
    listeners = {s: fed.observe([f"receipts/{s}"]) for s in fed.sites}
    fed.start()
    wait_until(lambda: announcements(fed, watch.messages), timeout=ROUND_TIMEOUT, what="round 1 to be announced",
               federation=fed)

    # Site0's broker account writing where only site1, or only the coordinator, may write.
    initial = fed.store.load_model(1)
    forged_id = "f0" * 16
    forged = {
        "updates/site1": _forged_update(fed, site="site0", rnd=1, base=initial, update_id=forged_id),
        "status/site1": b'{"state": "idle"}',
        "receipts/site1": b"receipt",
        "round": b"announcement",
    }
    with fed.borrow("site0") as intruder:
        for topic, payload in forged.items():
            handle = intruder.publish(T + topic, payload)
            assert handle.wait(10), f"no PUBACK for {topic}"
            assert handle.reason_code == NOT_AUTHORIZED, f"{topic}: reason {handle.reason_code}"

    # Duplicate deliveries after the round closed: site0's sealed update of round 1, captured from the
    # store, sent twice more on its own topic with its own credentials.
    dup_id = wait_until(lambda: _accepted(fed, "site0", 1), timeout=ROUND_TIMEOUT,
                        what="site0's update of round 1 to be accepted", federation=fed)
    captured = fed.store.read_update(1, "site0", dup_id)
    wait_until(lambda: fed.aggregated(1), timeout=ROUND_TIMEOUT, what="round 1 to close", federation=fed)
    with fed.borrow("site0") as duplicator:
        for _ in range(2):
            duplicator.publish(T + "updates/site0", captured).result(10)

    # A hostile client with a site's credentials, on that site's own topic, once round 2 is open.
    counted = next(r["sites"] for r in fed.records("round_aggregated") if r["round"] == 1)
    hostile = next(s for s in counted if s != "site0")
    own_id = _accepted(fed, hostile, 1)
    own = fed.store.read_update(1, hostile, own_id)
    flipped = bytearray(own)
    flipped[len(own) // 2] ^= 0x01
    future_id = "9e" * 16
    attacks = [
        (b"garbage", None, "malformed"),
        (b"", None, "malformed"),
        (os.urandom(200_000), None, "too_large"),
        (bytes(flipped), None, "bad_seal"),
        (own[:200], None, "bad_seal"),
        (own, own_id, "stale_round"),  # its own round-1 update, replayed in round 2
        (captured, None, "site_mismatch"),  # site0's update, republished as its own
        (_forged_update(fed, site=hostile, rnd=9, base=initial, update_id=future_id), future_id, "unknown_round"),
    ]
    with fed.borrow(hostile) as attacker:
        for payload, _, _ in attacks:
            attacker.publish(T + f"updates/{hostile}", payload).result(10)

    _finish(fed)
    check_rounds(fed, rounds=2, published=announcements(fed, watch.messages))

    # The broker delivered nothing forged: no record of the forged update, nothing read from other sites.
    assert not [r for r in fed.records() if r.get("update_id") == forged_id]
    assert {m.topic for m in snoop.messages} <= {T + "round", T + f"receipts/{probe}"}
    assert any(m.topic == T + "round" for m in snoop.messages)  # the snoop was listening all along
    # The duplicates were counted once: accepted in round 1, each copy refused as stale in round 2.
    verdicts = [(r["kind"], r["round"], r.get("reason")) for r in fed.records() if r.get("update_id") == dup_id]
    assert verdicts == [("update_accepted", 1, None)] + [("update_rejected", 2, "stale_round")] * 2, verdicts
    answers = [(r.accepted, r.reason) for r in receipts(fed, listeners["site0"].messages, "site0")
               if r.update_id == dup_id]
    assert answers == [(True, "")] + [(False, "stale_round")] * 2
    # Each attack was refused with its own reason, on a signed receipt too; none was counted.
    rejected = sorted((r["update_id"] or "", r["reason"]) for r in fed.records("update_rejected")
                      if r["site"] == hostile and r["update_id"] in (None, own_id, future_id))
    assert rejected == sorted((uid or "", reason) for _, uid, reason in attacks)
    answered = sorted((r.update_id, r.reason) for r in receipts(fed, listeners[hostile].messages, hostile)
                      if not r.accepted and r.update_id in (NO_UPDATE_ID, own_id, future_id))
    assert answered == sorted((uid or NO_UPDATE_ID, reason) for _, uid, reason in attacks)


def test_a_federation_survives_crashes_a_broker_restart_an_outage_and_duplicates(running):
    fed = running(sites=3, rounds=5, quorum=2, grace=4.0, relayed=("site2",))
    fed.start_broker()
    watch = fed.observe(["round"])
    receipts2 = fed.observe(["receipts/site2"])
    status2 = fed.observe(["status/site2"])
    # 1. The coordinator SIGKILLs itself right after its second receipt of round 1: both updates are
    #    stored and acknowledged, their round-log lines written before the receipts. Started again.
    fed.start(kill_coordinator_after="SendReceipt:2")
    wait_until(lambda: fed.returncode("coordinator") is not None, timeout=ROUND_TIMEOUT,
               what="the coordinator to kill itself after its second receipt", federation=fed)
    assert fed.returncode("coordinator") == -signal.SIGKILL, fed.tails("coordinator")
    assert fed.store.load_state().round == 1
    before_kill = [r["update_id"] for r in fed.records("update_accepted") if r["round"] == 1]
    # Both receipted updates are in the log; a third accepted in the same batch may be too (its line
    # is written with theirs, before any receipt of the batch). None is there twice.
    assert len(before_kill) >= 2, f"the round log lacks an update receipted before the kill: {before_kill}"
    assert len(set(before_kill)) == len(before_kill), before_kill
    fed.start_coordinator()

    # 2. Power cut of site0 (daemon and trainer) just after it stored its update of round 2 (or, should
    #    round 2 close before that, at its close); restarted.
    wait_until(lambda: fed.site_logged("site0", STORED.format(round=2)) or fed.aggregated(2),
               timeout=ROUND_TIMEOUT, what="site0 to store its update of round 2", federation=fed)
    fed.kill("site0")
    stored = fed.site_logged("site0", STORED.format(round=2))
    fed.restart("site0")

    # 3. mosquitto stopped and started again in the middle of round 3 (persistence on): right after the
    #    restart, the retained announcement is still there.
    wait_until(lambda: any(r["round"] == 3 for r in fed.records("update_accepted")), timeout=ROUND_TIMEOUT,
               what="a first update of round 3", federation=fed)
    assert fed.stop("mosquitto") == 0
    fed.restart("mosquitto")
    fresh = fed.observe(["round"])  # subscribed again (and on the reconnect): mosquitto sends what it retained
    retained = wait_until(lambda: next((m for m in fresh.messages if m.retain), None), timeout=30,
                          what="the retained round announcement to survive the restart", federation=fed)
    kept = announcements(fed, [retained])[0].header
    assert kept.round >= 3 and kept.model_sha256 == wire.model_sha256(fed.store.load_model(kept.round))

    # 4. site2's link goes down once it starts training round 4 (the broker publishes its will): round 4
    #    closes without it, by grace; meanwhile another site's accepted update is delivered twice more.
    wait_until(lambda: fed.site_logged("site2", r"trainer \d+ started for round 4\b"), timeout=ROUND_TIMEOUT,
               what="site2 to start training round 4", federation=fed)
    offline = sum(m.payload == OFFLINE for m in status2.messages)
    fed.relays["site2"].outage()  # until restore()
    wait_until(lambda: sum(m.payload == OFFLINE for m in status2.messages) > offline, timeout=30,
               what="mosquitto to publish site2's last will (offline)", federation=fed)
    first = wait_until(lambda: next((r for r in fed.records("update_accepted") if r["round"] == 4), None),
                       timeout=ROUND_TIMEOUT, what="a first update of round 4", federation=fed)
    again = fed.store.read_update(4, first["site"], first["update_id"])
    with fed.borrow(first["site"]) as duplicator:
        for _ in range(2):
            duplicator.publish(T + f"updates/{first['site']}", again).result(10)
    late = wait_until(lambda: fed.site_logged("site2", STORED.format(round=4)), timeout=ROUND_TIMEOUT,
                      what="site2 to store its update of round 4 while offline", federation=fed)
    wait_until(lambda: fed.aggregated(4), timeout=ROUND_TIMEOUT, what="round 4 to close without site2",
               federation=fed)
    assert fed.relays["site2"].stats.held, "site2 did not try to reconnect while its link was down"
    fed.relays["site2"].restore()

    _finish(fed)
    counted = check_rounds(fed, rounds=5, published=announcements(fed, watch.messages))
    # The two updates receipted before the kill were counted in round 1, once each
    round1 = [r for r in fed.records("update_accepted") if r["round"] == 1]
    ids = [r["update_id"] for r in round1]
    assert set(before_kill) <= set(ids) and len(ids) == len(set(ids)), ids
    assert {r["site"] for r in round1 if r["update_id"] in before_kill} <= set(counted[1]), counted[1]
    assert "site0" in counted[3] + counted[4] + counted[5], "site0 did not come back after its power cut"
    if stored is not None:  # stored before the cut: sent again from the outbox, counted at most once
        again_sent = [r["kind"] for r in fed.records() if r.get("site") == "site0"
                      and (r.get("update_id") or "").startswith(stored.group(1))]
        assert again_sent.count("update_accepted") <= 1 and len(again_sent) >= 1, again_sent
    # The duplicates in the open round 4 were acknowledged again, not counted again.
    copies = [(r["kind"], r["round"]) for r in fed.records() if r.get("update_id") == first["update_id"]]
    assert copies == [("update_accepted", 4), ("update_redelivered", 4), ("update_redelivered", 4)], copies
    # site2's late update was refused as stale, with a signed receipt, and site2 joined round 5.
    assert "site2" not in counted[4]
    late_prefix = late.group(1)
    refused = [r for r in fed.records("update_rejected")
               if r["site"] == "site2" and (r["update_id"] or "").startswith(late_prefix)]
    assert [(r["update_round"], r["reason"]) for r in refused] == [(4, "stale_round")], refused
    receipt = [r for r in receipts(fed, receipts2.messages, "site2") if r.update_id == refused[0]["update_id"]]
    assert [(r.round, r.accepted, r.reason) for r in receipt] == [(4, False, "stale_round")]
    assert fed.site_logged("site2", rf"round 4: update {late_prefix}\w* rejected: stale_round")
    assert "site2" in counted[5]

