"""What keeps a coordinator's cost per update flat: each update opened once, the state written as
log lines between transitions, receipts in arrival order with the verification threads."""

from __future__ import annotations

import json

import numpy as np


from fednca_broker import verifier
from fednca_broker.rounds import RoundConfig, UpdateVerified, handle, open_round
from fednca_broker.store import RoundStore
from test_coordinator import FED, SITES, Federation, expected_model, world  # noqa: F401 (fixture)

SHA = "d" * 64


def test_each_update_is_opened_once_and_the_close_needs_no_crypto(world, tmp_path, monkeypatch):
    calls = []
    real = verifier.verify_update
    monkeypatch.setattr(verifier, "verify_update", lambda *a, **k: calls.append(k["topic_site"]) or real(*a, **k))
    fed = Federation(world, tmp_path).start()
    for site in SITES:
        fed.send(site)
    fed.coordinator.step()
    assert fed.coordinator.round == 2
    assert sorted(calls) == sorted(SITES)  # on arrival only: the close read the spool
    model = fed.store.load_model(2)
    for name, value in expected_model(world).items():
        np.testing.assert_array_equal(model[name], value)
    assert not fed.store.spool_folder(1).exists()  # the round's deltas are gone once it is aggregated


def test_receipts_keep_the_arrival_order_with_verification_threads(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    fed.drain()
    order = ["c", "a", "b"]
    for site in order:
        fed.send(site)
    fed.send("a", b"garbage")  # rejected between accepted ones
    fed.coordinator.step()
    receipts = fed.receipts([m for m in fed.drain() if "/receipts/" in m.topic])
    assert [(r.site, r.accepted) for r in receipts] == [("c", True), ("a", True), ("b", True), ("a", False)]


def test_acceptances_are_log_lines_and_only_transitions_write_the_snapshot(tmp_path):
    store = RoundStore(root=tmp_path, federation="fed")
    state, _ = open_round(federation="fed", round=1, model_sha256=SHA, enrolled={"a", "b", "c", "d"},
                          config=RoundConfig(quorum_count=2), now=0.0)  # fmt: skip
    store.save_state(state)
    snapshot = store.state_path.read_bytes()
    for i, site in enumerate("abc", 1):
        state, _ = handle(state, UpdateVerified(site, f"{i:02x}", 1, SHA, 5, 50, False), float(i))
        store.save_state(state)
        assert store.state_path.read_bytes() == snapshot  # not rewritten: the acceptance is a line
    lines = [json.loads(line) for line in store.log_path.read_text().splitlines()]
    assert [(r["kind"], r["site"]) for r in lines] == [("update_accepted", s) for s in "abc"]
    again = RoundStore(root=tmp_path, federation="fed").load_state()
    assert again == state and again.quorum_at == 2.0  # set by the second acceptance, as the policy did
    state, _ = handle(state, UpdateVerified("d", "04", 1, SHA, 5, 50, False), 9.0)  # the last: it closes
    store.save_state(state)
    assert store.state_path.read_bytes() != snapshot
    assert json.loads(store.state_path.read_bytes())["log_bytes"] == store.log_path.stat().st_size
    assert RoundStore(root=tmp_path, federation="fed").load_state() == state


def test_a_snapshot_whose_log_is_shorter_than_it_says_is_refused(tmp_path):
    store = RoundStore(root=tmp_path, federation="fed")
    state, _ = open_round(federation="fed", round=1, model_sha256=SHA, enrolled={"a"}, config=RoundConfig(), now=0.0)
    store.save_state(state)
    document = json.loads(store.state_path.read_bytes())
    store.state_path.write_text(json.dumps(dict(document, log_bytes=10_000)))
    try:
        RoundStore(root=tmp_path, federation="fed").load_state()
    except Exception as e:  # StoreError
        assert "covers 10000" in str(e)
    else:
        raise AssertionError("a log shorter than the snapshot says was accepted")


def test_the_state_is_the_same_object_family_and_an_old_state_never_changes():
    state, _ = open_round(federation="fed", round=1, model_sha256=SHA, enrolled={"a", "b", "c"},
                          config=RoundConfig(quorum_count=3), now=0.0)  # fmt: skip
    one, _ = handle(state, UpdateVerified("a", "01", 1, SHA, 5, 50, False), 1.0)
    two, _ = handle(one, UpdateVerified("b", "02", 1, SHA, 5, 50, False), 2.0)
    branch, _ = handle(one, UpdateVerified("c", "03", 1, SHA, 5, 50, False), 3.0)  # from the older state
    assert [a.site for a in one.accepted] == ["a"]
    assert [a.site for a in two.accepted] == ["a", "b"] and [a.site for a in branch.accepted] == ["a", "c"]
    assert one.accepted_from("b") is None and two.accepted_from("c") is None
