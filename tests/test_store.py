"""The coordinator's round store, on a temporary folder."""

import json
import os
import stat

import numpy as np
import pytest

from fednca.rounds_vocab import CloseReason
from fednca_broker.recovery import RoundLogIndex
from fednca_broker.roundlog import RoundClosedRecord, RoundOpenedRecord, UpdateAcceptedRecord, encode
from fednca_broker.rounds import (
    Ack,
    LogEvent,
    RoundConfig,
    SaveState,
    SendReceipt,
    StoreUpdate,
    UpdateVerified,
    handle,
    open_round,
)
from fednca_broker.store import RoundStore, StoreError

SHA = "c" * 64
CLOSED = RoundClosedRecord(at=2.0, round=1, reason="all_reported", sites=("a",), samples=1, extensions=0)
UID = {"a": "0a" * 16, "b": "0b" * 16, "c": "0c" * 16}


def opened(sites=("a", "b", "c"), config=RoundConfig(quorum_count=2)):
    return open_round(federation="fed", round=1, model_sha256=SHA, enrolled=set(sites), config=config, now=0.0)


def update(site, now=1.0):
    return UpdateVerified(site, UID[site], 1, SHA, 5, 50, False)


@pytest.fixture
def store(tmp_path):
    return RoundStore(root=tmp_path, federation="fed")


def test_state_round_trips_atomically_and_privately(store):
    state, _ = opened()
    state, _ = handle(state, update("a"), 1.0)
    assert store.load_state() is None
    store.save_state(state)
    assert store.load_state() == state
    assert json.loads(store.state_path.read_text())["format"] == 1
    assert stat.S_IMODE(store.state_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "content, match",
    [(b"{not json", "unreadable"), (b'{"format": 2, "state": {}}', "format 1"), (b"[]", "format 1"),
     (b'{"format": 1, "state": {"round": 1}}', "round state")],
)
def test_a_damaged_state_file_is_an_error_naming_it(store, content, match):
    store.state_path.write_bytes(content)
    with pytest.raises(StoreError, match=match) as info:
        store.load_state()
    assert "state.json" in str(info.value)


def test_state_of_another_federation_is_refused(tmp_path):
    state, _ = opened()
    with pytest.raises(StoreError, match="federation 'fed'"):
        RoundStore(root=tmp_path, federation="other").save_state(state)


def test_updates_are_stored_under_their_round(store):
    path = store.put_update(1, "a", UID["a"], b"sealed bytes")
    assert path == store.folder / "rounds" / "1" / f"a-{UID['a']}.bin"
    assert store.read_update(1, "a", UID["a"]) == b"sealed bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(StoreError, match="missing"):
        store.read_update(1, "b", UID["b"])


@pytest.mark.parametrize(
    "round, site, update_id, match",
    [(1, "../x", "ab", "site"), (1, ".hidden", "ab", "site"), (1, "a", "../ab", "update id"),
     (1, "a", "AB", "update id"), (-1, "a", "ab", "round"), (True, "a", "ab", "round")],
)
def test_update_names_cannot_escape_the_folder(store, round, site, update_id, match):
    with pytest.raises(StoreError, match=match):
        store.put_update(round, site, update_id, b"x")
    assert not list((store.folder / "rounds").rglob("*.bin"))


def test_accepted_updates_are_read_back_in_acceptance_order(store):
    state, _ = opened()
    for site in ("c", "a"):
        state, _ = handle(state, update(site), 1.0)
        store.put_update(1, site, UID[site], site.encode() * 3)
    reader = store.read_accepted(state)
    assert next(reader)[1] == b"ccc"
    assert [(entry.site, data) for entry, data in reader] == [("a", b"aaa")]


def test_the_log_appends_lines_and_drops_a_torn_tail(store):
    store.append_log(RoundOpenedRecord(at=0.0, round=1, model_sha256=SHA, deadline=60.0, quorum=1, enrolled=("a",)))
    store.append_log(UpdateAcceptedRecord(at=1.0, round=1, site="a", update_id="a1", samples=1, steps=1,
                                          partial=False))  # fmt: skip
    with open(store.log_path, "ab") as f:
        f.write(b'{"kind": "upd')  # a crash in the middle of an append
    assert [r["kind"] for r in store.read_log()] == ["round_opened", "update_accepted"]
    again = RoundStore(root=store.folder.parent, federation="fed")
    again.append_log(CLOSED)  # the next process cuts the torn line before appending
    assert [r["kind"] for r in again.read_log()] == ["round_opened", "update_accepted", "round_closed"]


def test_the_log_reads_back_typed_records_spelt_as_before(store):
    accepted = UpdateAcceptedRecord(at=1.5, round=1, site="a", update_id="a1", samples=5, steps=50, partial=False,
                                    recovered=True)  # fmt: skip
    store.append_logs([accepted, CLOSED])
    lines = [json.loads(line) for line in store.log_path.read_text().splitlines()]
    assert lines[1] == {"kind": "round_closed", "at": 2.0, "round": 1, "reason": "all_reported", "sites": ["a"],
                        "samples": 1, "extensions": 0}  # fmt: skip
    assert lines[0]["recovered"] is True and "recovered" not in lines[1]
    records = store.read_log()
    assert records == [accepted, CLOSED]
    assert isinstance(records[1], RoundClosedRecord) and records[1].reason is CloseReason.ALL_REPORTED
    assert records[1].sites == ("a",) and records[1]["sites"] == ["a"] and records[1].get("recovered") is None


def test_a_line_of_an_unknown_kind_or_with_a_missing_field_is_named(store):
    for line in (b'{"kind": "round_paused", "at": 1.0}\n', b'{"kind": "round_closed", "at": 1.0, "round": 1}\n'):
        store.log_path.write_bytes(line)
        with pytest.raises(StoreError, match="line 1 is not a round-log record"):
            store.read_log()


def test_a_restart_finds_the_lines_a_crash_kept_out_of_the_log():
    state, _ = opened(sites=("a",))
    state, _ = handle(state, update("a"), 1.0)  # the only site: the round closes
    first = UpdateAcceptedRecord(at=1.0, round=1, site="a", update_id=UID["a"], samples=5, steps=50, partial=False)
    missing = RoundLogIndex([first]).missing(state)
    assert [(r.kind, r.recovered) for r in missing] == [("round_closed", True)]
    assert [r.kind for r in RoundLogIndex().missing(state)] == ["update_accepted", "round_closed"]
    assert RoundLogIndex([first, *missing]).missing(state) == []


def test_a_damaged_log_line_is_named(store):
    line = json.dumps(encode(CLOSED)).encode()
    store.log_path.write_bytes(line + b"\nnonsense\n" + line + b"\n")
    with pytest.raises(StoreError, match="line 2"):
        store.read_log()


def test_models_round_trip_as_float32_safetensors(store):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5], dtype=np.float32)}
    data = store.save_model(3, tensors, metadata={"sha256": SHA})
    assert store.model_path(3).read_bytes() == data
    loaded = store.load_model(3)
    assert set(loaded) == {"w", "b"}
    np.testing.assert_array_equal(loaded["w"], tensors["w"])
    store.save_model(1, tensors)
    assert store.model_rounds() == [1, 3]
    with pytest.raises(StoreError, match="float32"):
        store.save_model(4, {"w": np.zeros(2)})
    with pytest.raises(StoreError, match="no global model for round 2"):
        store.load_model(2)
    store.model_path(5).write_bytes(b"garbage!" * 4)
    with pytest.raises(StoreError, match="5.safetensors"):
        store.load_model(5)


def test_recover_removes_temporaries_and_lists_uncounted_updates(store):
    state, _ = opened()
    state, _ = handle(state, update("a"), 1.0)
    store.put_update(1, "a", UID["a"], b"a")
    store.save_state(state)
    orphan = store.put_update(1, "b", UID["b"], b"b")  # stored, but the crash came before its state
    temps = [store.folder / ".state.json.x1y2.tmp", store.folder / "rounds" / "1" / f".b-{UID['b']}.bin.zz.tmp"]
    for t in temps:
        t.write_bytes(b"half")
    recovery = RoundStore(root=store.folder.parent, federation="fed").recover()
    assert recovery.state == state
    assert recovery.orphans == (orphan,)
    assert sorted(recovery.removed) == sorted(temps)
    assert not any(t.exists() for t in temps) and orphan.exists()


def test_recover_refuses_a_state_whose_update_is_missing(store):
    state, _ = opened()
    state, _ = handle(state, update("a"), 1.0)
    store.save_state(state)
    with pytest.raises(StoreError, match="counts this update but it is missing"):
        store.recover()


def test_a_fresh_federation_recovers_to_nothing(store):
    assert store.recover().state is None


# Kill the coordinator after any action; on restart the broker re-delivers what was not acked. ------


def _messages():
    return [(1.0, update("a")), (2.0, update("b")), (3.0, update("c"))]


def _perform(store, actions, payload, budget, acked):
    """Perform actions as the shell would, until ``budget`` actions are spent; False if killed."""
    for action in actions:
        if budget[0] == 0:
            return False
        budget[0] -= 1
        if isinstance(action, StoreUpdate):
            store.put_update(action.round, action.site, action.update_id, payload)
        elif isinstance(action, SaveState):
            store.save_state(action.state)
        elif isinstance(action, Ack):
            acked.add(action.update_id)
        elif isinstance(action, LogEvent):
            store.append_log(action.record)
        elif isinstance(action, SendReceipt):
            pass  # published to the site; nothing durable on this side
    return True


def _run(root, budget, acked):
    """Open the round, then handle messages not yet acknowledged; stop when the budget runs out."""
    store = RoundStore(root=root, federation="fed")
    state = store.recover().state
    if state is None:
        state, actions = opened()
        if not _perform(store, actions, b"", budget, acked):
            return None
    for now, message in _messages():
        if message.update_id in acked:
            continue  # the broker delivers only what was not acknowledged
        state, actions = handle(state, message, now)
        if not _perform(store, actions, f"payload {message.site}".encode(), budget, acked):
            return None
    return state


def test_a_kill_at_any_point_loses_no_acknowledged_update(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # the kill is simulated: what matters is the order
    total = [10**6]
    _run(tmp_path / "whole", total, set())
    steps = 10**6 - total[0]
    assert steps > 10
    for cut in range(steps):
        root, acked = tmp_path / f"cut{cut}", set()
        assert _run(root, [cut], acked) is None
        recovered = RoundStore(root=root, federation="fed").recover().state
        counted = {a.update_id for a in recovered.accepted} if recovered else set()
        assert acked <= counted, f"killed after {cut} actions: acknowledged but not counted"
        final = _run(root, [10**6], acked)
        assert final.close_reason == "all_reported"
        assert [a.site for a in final.accepted] == ["a", "b", "c"]
        store = RoundStore(root=root, federation="fed")
        assert [data for _, data in store.read_accepted(final)] == [b"payload a", b"payload b", b"payload c"]
