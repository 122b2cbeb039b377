"""The buffered asynchronous round policy, driven directly with events and an explicit clock."""

import math

import numpy as np
import pytest

from fednca.aggregate import AggregationConfig
from fednca.aggregate_rows import aggregate_rows, layout_of
from fednca.errors import ConfigError
from fednca.rounds_vocab import CloseReason, Reason, RoundReason, RoundStatus
from fednca_broker import async_rounds, rounds
from fednca_broker.async_rounds import handle, open_round
from fednca_broker.round_events import (
    Ack, Announce, CloseRound, LogEvent, OpenRound, SaveState, SendReceipt, SiteRevoked, StoreUpdate, Tick,
    UpdateVerified,
)
from fednca_broker.round_state import RoundConfig, RoundState
from fednca_broker.roundlog import UpdateAcceptedRecord, decode, encode
from fednca_broker.staleness import StaleRows, stale_inputs, staleness_weight
from fednca_broker.store import RoundStore

SITES = ("A", "B", "C", "D", "E")
MODELS = [f"{i:x}" * 64 for i in range(1, 10)]  # the model of round r is MODELS[r - 1]
ASYNC = RoundConfig(mode="async", buffer_size=2, max_staleness=2, round_s=600.0, extension_s=300.0)


def up(site, round, *, uid=None, base=None, samples=10):
    return UpdateVerified(site, uid or f"{site.lower()}{round}", round, base or MODELS[round - 1], samples, 100, False)


def start(config=ASYNC, sites=SITES):
    return open_round(federation="clinics", round=1, model_sha256=MODELS[0], enrolled=set(sites), config=config,
                      now=0.0)[0]  # fmt: skip


def receipts(actions):
    return [(a.site, a.update_id, a.round, a.accepted, a.reason) for a in actions if isinstance(a, SendReceipt)]


def advance(state, now):
    """Open the next round, as the coordinator does after aggregating a closed one."""
    assert state.status == RoundStatus.CLOSED
    return handle(state, OpenRound(state.round + 1, MODELS[state.round]), now)[0]


def fill(state, sites, now):
    for site in sites:
        state, _ = handle(state, up(site, state.round), now)
    return state


def test_the_buffer_closes_when_full_without_waiting_for_grace_or_deadline():
    s = start()
    s, a1 = handle(s, up("A", 1), 10.0)
    assert s.status == RoundStatus.OPEN and receipts(a1) == [("A", "a1", 1, True, "accepted")]
    s, a2 = handle(s, up("B", 1), 11.0)
    assert s.status == RoundStatus.CLOSED and s.close_reason == CloseReason.BUFFER_FULL and s.closed_at == 11.0
    kinds = [type(a).__name__ for a in a2]
    # payload, then the one save of the closed state, then the ack, the receipt, the lines, the close
    assert kinds == ["StoreUpdate", "SaveState", "Ack", "SendReceipt", "LogEvent", "LogEvent", "CloseRound"]
    assert a2[1].state is s
    close = a2[-1]
    assert isinstance(close, CloseRound) and close.reason == CloseReason.BUFFER_FULL
    assert [u.site for u in close.accepted] == ["A", "B"]


def test_the_synchronous_grace_and_deadline_never_close_a_buffer():
    for grace in (0.0, 5.0):
        s = start(RoundConfig(mode="async", buffer_size=2, grace_s=grace, round_s=600.0))
        s, _ = handle(s, up("A", 1), 1.0)
        s, actions = handle(s, up("B", 1), 2.0)
        assert s.close_reason == CloseReason.BUFFER_FULL
        assert [a.reason for a in actions if isinstance(a, CloseRound)] == [CloseReason.BUFFER_FULL]


def test_an_update_from_an_earlier_version_is_counted_with_its_staleness():
    s = advance(fill(start(), "AB", 1.0), 2.0)  # round 2 trains from MODELS[1]
    s, actions = handle(s, up("C", 1), 5.0)  # C trained from round 1's model: one version behind
    assert receipts(actions) == [("C", "c1", 1, True, "accepted")]
    assert [type(a) for a in actions][:3] == [StoreUpdate, SaveState, Ack]
    assert actions[0].round == 2  # stored with the round that counts it
    entry = s.accepted_from("C")
    assert entry.staleness == 1
    line = next(a.record for a in actions if isinstance(a, LogEvent) and isinstance(a.record, UpdateAcceptedRecord))
    assert line.round == 2 and line.staleness == 1
    assert decode(encode(line)) == line and encode(line)["staleness"] == 1


def test_past_max_staleness_an_update_is_refused_as_too_stale():
    s = start()
    for r in range(1, 4):  # rounds 1, 2, 3 fill and close; round 4 opens
        s = advance(fill(s, "AB", float(r)), float(r) + 0.5)
    assert s.round == 4 and len(s.earlier) == ASYNC.max_staleness
    s, ok = handle(s, up("C", 2), 10.0)  # two versions behind: taken
    assert receipts(ok) == [("C", "c2", 2, True, "accepted")] and s.accepted_from("C").staleness == 2
    s2, refused = handle(s, up("D", 1), 11.0)  # three versions behind
    assert receipts(refused) == [("D", "d1", 1, False, RoundReason.TOO_STALE)]
    assert s2 is s and not any(isinstance(a, (StoreUpdate, SaveState)) for a in refused)


def test_an_earlier_version_must_name_that_versions_model():
    s = advance(fill(start(), "AB", 1.0), 2.0)
    s2, actions = handle(s, up("C", 1, base=MODELS[5]), 3.0)
    assert receipts(actions) == [("C", "c1", 1, False, Reason.WRONG_BASE_MODEL)] and s2 is s


def test_a_redelivery_of_an_update_counted_in_an_earlier_buffer_counts_nothing():
    s = advance(fill(start(), "AB", 1.0), 2.0)
    s2, actions = handle(s, up("A", 1), 3.0)  # A's receipt was lost on its link: the same update again
    assert receipts(actions) == [("A", "a1", 1, True, "accepted")]
    assert s2 is s and len(s2.accepted) == 0 and not any(isinstance(a, StoreUpdate) for a in actions)
    assert [type(a) for a in actions] == [Ack, SendReceipt, LogEvent]


def test_one_update_per_site_and_buffer():
    s = advance(fill(start(), "AB", 1.0), 2.0)
    s, _ = handle(s, up("C", 2), 3.0)
    s2, actions = handle(s, up("C", 1), 4.0)  # a late one of C's, after a fresh one of C's
    assert receipts(actions) == [("C", "c1", 1, False, RoundReason.DUPLICATE_SITE)] and s2 is s


def test_unknown_sites_and_empty_updates_are_refused():
    s = advance(fill(start(), "AB", 1.0), 2.0)
    assert receipts(handle(s, up("Z", 1), 3.0)[1]) == [("Z", "z1", 1, False, Reason.UNKNOWN_SITE)]
    assert receipts(handle(s, up("C", 1, samples=0), 3.0)[1]) == [("C", "c1", 1, False, RoundReason.NO_SAMPLES)]


def test_the_kept_history_stays_within_max_staleness():
    s = start()
    for r in range(1, 8):
        s = advance(fill(s, "AB", float(r)), float(r) + 0.5)
        assert len(s.earlier) == min(r, ASYNC.max_staleness)
        assert s.earlier[0].model_sha256 == MODELS[r - 1]
    assert s.earlier[0].updates == ("A/a7", "B/b7")
    none = start(RoundConfig(mode="async", buffer_size=1, max_staleness=0))
    none = advance(fill(none, "A", 1.0), 2.0)
    assert none.earlier == () and receipts(handle(none, up("B", 1), 3.0)[1])[0][4] == RoundReason.TOO_STALE


def test_the_deadline_is_extended_while_the_buffer_fills():
    s, _ = handle(start(), up("A", 1), 10.0)
    s, actions = handle(s, Tick(), 600.0)
    assert s.status == RoundStatus.OPEN and s.deadline == 900.0 and s.extensions == 1
    assert any(isinstance(a, Announce) and a.deadline == 900.0 for a in actions)
    s, _ = handle(s, up("B", 1), 650.0)
    assert s.close_reason == CloseReason.BUFFER_FULL


def test_time_runs_before_a_stale_update_is_judged():
    s = advance(fill(start(), "AB", 1.0), 2.0)  # round 2's deadline: 602
    s, actions = handle(s, up("C", 1), 700.0)
    assert s.deadline == 1000.0 and s.accepted_from("C") is not None
    assert [type(a) for a in actions][:2] == [StoreUpdate, SaveState]


def test_a_revocation_that_leaves_every_site_in_the_buffer_closes_it():
    s = start(RoundConfig(mode="async", buffer_size=3, max_staleness=2), sites="ABC")
    s, _ = handle(s, up("A", 1), 1.0)
    s, _ = handle(s, up("B", 1), 2.0)
    s, actions = handle(s, SiteRevoked("C"), 3.0)  # both sites still enrolled are in the buffer
    assert s.close_reason == CloseReason.ALL_REPORTED and any(isinstance(a, CloseRound) for a in actions)


def test_the_synchronous_mode_is_the_unchanged_default():
    assert RoundConfig().mode == "sync"
    state = rounds.open_round(federation="f", round=1, model_sha256=MODELS[0], enrolled=set(SITES),
                              config=RoundConfig(), now=0.0)[0]  # fmt: skip
    for event, now in ((up("A", 1), 1.0), (up("B", 2), 2.0), (Tick(), 400.0)):
        assert async_rounds.handle(state, event, now)[1] == rounds.handle(state, event, now)[1]
    s, actions = async_rounds.handle(state, up("A", 0), 1.0)  # an older round is stale in sync mode
    assert receipts(actions) == [("A", "a0", 0, False, Reason.STALE_ROUND)]


@pytest.mark.parametrize("changes, key", [
    ({"mode": "fedbuff"}, "mode"), ({"mode": "async", "buffer_size": 0}, "buffer_size"),
    ({"mode": "async", "max_staleness": -1}, "max_staleness"), ({"max_staleness": 1.5}, "max_staleness"),
    ({"buffer_size": True}, "buffer_size"),
])  # fmt: skip
def test_bad_mode_settings_name_their_key(changes, key):
    with pytest.raises(ConfigError) as e:
        RoundConfig(**changes)
    assert e.value.field == key


def test_the_buffer_size_is_the_quorum_capped_at_the_enrolment():
    assert ASYNC.quorum(5) == 2 and ASYNC.quorum(1) == 1
    assert RoundConfig(mode="async", buffer_size=9).quorum(4) == 4


def test_a_restart_in_the_middle_of_a_buffer_resumes_it(tmp_path):
    store = RoundStore(root=tmp_path, federation="clinics")
    cfg = RoundConfig(mode="async", buffer_size=3, max_staleness=2)
    s, actions = open_round(federation="clinics", round=1, model_sha256=MODELS[0], enrolled=set(SITES),
                            config=cfg, now=0.0)  # fmt: skip
    store.save_state(s)

    def perform(state, actions):
        for a in actions:
            if isinstance(a, SaveState):
                store.save_state(a.state, log=[x.record for x in actions if isinstance(x, LogEvent)])
        return state

    for site in "ABC":
        s = perform(*handle(s, up(site, 1), 1.0))
    s = perform(*handle(s, OpenRound(2, MODELS[1]), 2.0))
    s = perform(*handle(s, up("D", 1), 3.0))  # stale, counted in round 2
    s = perform(*handle(s, up("A", 2), 4.0))  # fresh: the buffer holds two of three
    resumed = RoundStore(root=tmp_path, federation="clinics").load_state()
    assert resumed == s and resumed.accepted_from("D").staleness == 1
    assert [e.model_sha256 for e in resumed.earlier] == [MODELS[0]]
    assert resumed.earlier[0].updates == ("A/a1", "B/b1", "C/c1")
    # the resumed state goes on as the one that crashed would have
    again, actions = handle(resumed, up("B", 1), 5.0)
    assert receipts(actions) == [("B", "b1", 1, True, "accepted")] and again is resumed
    closed, actions = handle(resumed, up("E", 1), 5.0)
    assert closed.close_reason == CloseReason.BUFFER_FULL
    assert [(u.site, u.staleness) for u in closed.accepted] == [("D", 1), ("A", 0), ("E", 1)]


def test_a_state_file_of_the_first_release_reads_back():
    data = start(RoundConfig()).to_dict()
    del data["earlier"]
    for key in ("mode", "buffer_size", "max_staleness"):
        del data["config"][key]
    for entry in data["accepted"]:
        entry.pop("staleness")
    state = RoundState.from_dict(data)
    assert state.earlier == () and state.config.mode == "sync"


def test_staleness_weight_is_fedbuffs_polynomial_rule():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(1) == pytest.approx(1 / math.sqrt(2))
    assert staleness_weight(3) == 0.5
    with pytest.raises(ValueError):
        staleness_weight(-1)


class _Rows:
    def __init__(self, matrix):
        self.m = np.asarray(matrix, dtype=np.float32)
        self.n, self.size = self.m.shape

    def row(self, i):
        return self.m[i]

    def blocks(self):
        yield 0, self.m


def test_a_stale_delta_moves_the_model_less():
    layout = layout_of({"w": (2,)})
    rows = _Rows([[1.0, 1.0], [1.0, 1.0], [4.0, -4.0]])
    norms = [math.sqrt(2)] * 2 + [math.sqrt(32)]
    cfg = AggregationConfig(method="fedavg", median_norm_factor=None, max_weight_ratio=None)
    fresh = aggregate_rows(rows, weights=[1, 1, 1], norms=norms, layout=layout, cfg=cfg)
    same_rows, same_norms = stale_inputs(rows, norms, [0, 0, 0])
    assert same_rows is rows and same_norms == norms  # the synchronous mode's inputs, untouched
    stale_rows, stale_norms = stale_inputs(rows, norms, [0, 0, 3])
    stale = aggregate_rows(stale_rows, weights=[1, 1, 1], norms=stale_norms, layout=layout, cfg=cfg)
    np.testing.assert_allclose(fresh["w"], [2.0, -2 / 3], rtol=1e-6)
    np.testing.assert_allclose(stale["w"], [(1 + 1 + 2) / 3, (1 + 1 - 2) / 3], rtol=1e-6, atol=1e-7)
    assert isinstance(stale_rows, StaleRows) and stale_norms[2] == pytest.approx(math.sqrt(32) / 2)
