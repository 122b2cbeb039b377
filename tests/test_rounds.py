"""The round policy, driven directly with events and an explicit clock."""

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednca.errors import ConfigError, FedNCAError
from fednca.rounds_vocab import CloseReason, Reason, RoundReason, RoundStatus
from fednca_broker.errors import BrokerError, CoordinatorError, StoreError
from fednca_broker.rounds import (
    Ack,
    Announce,
    CloseRound,
    IllegalRoundEvent,
    LogEvent,
    OpenRound,
    RoundConfig,
    RoundState,
    RoundStateError,
    SaveState,
    SendReceipt,
    SiteEnrolled,
    SiteRevoked,
    StoreUpdate,
    Tick,
    UpdateRejected,
    UpdateVerified,
    handle,
    open_round,
)

SHA, OTHER = "a" * 64, "b" * 64
SITES = ("A", "B", "C", "D", "E")  # default quorum: ceil(0.6 * 5) = 3


def up(site, uid=None, *, round=1, base=SHA, samples=10):
    return UpdateVerified(site, uid or f"{site.lower()}1", round, base, samples, 100, False)


def ok(site, uid=None):
    return (site, uid or f"{site.lower()}1", True, "accepted")


def no(site, reason, uid=None):
    return (site, uid or f"{site.lower()}1", False, reason)


def start(enrolled=SITES, config=RoundConfig()):
    return open_round(federation="clinics", round=1, model_sha256=SHA, enrolled=set(enrolled), config=config,
                      now=0.0)[0]  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple  # (now, event) pairs, after round 1 opened at t=0 with deadline 3600
    closed_by: str | None  # close reason; None: still open
    accepted: tuple[str, ...]  # accepted sites, in order
    receipts: tuple  # (site, update id, accepted, reason) in the order sent
    enrolled: tuple[str, ...] = SITES
    config: RoundConfig = field(default_factory=RoundConfig)
    extensions: int = 0
    deadline: float = 3600.0


SCENARIOS = [
    Scenario(
        "quorum reached, then grace",
        ((10, up("A")), (20, up("B")), (30, up("C")), (200, up("D")), (329, Tick()), (330, Tick()), (331, up("E"))),
        "grace", ("A", "B", "C", "D"),
        (ok("A"), ok("B"), ok("C"), ok("D"), no("E", "round_closed")),
    ),
    Scenario(
        "an update after the grace period is late even without a tick",
        ((10, up("A")), (20, up("B")), (30, up("C")), (400, up("D"))),
        "grace", ("A", "B", "C"),
        (ok("A"), ok("B"), ok("C"), no("D", "round_closed")),
    ),
    Scenario(
        "all reported early",
        tuple((i, up(s)) for i, s in enumerate(SITES, 1)) + ((6, Tick()),),
        "all_reported", SITES,
        tuple(ok(s) for s in SITES),
    ),
    Scenario(
        "deadline with quorum closes before the grace period ends",
        ((3500, up("A")), (3510, up("B")), (3520, up("C")), (3599, Tick()), (3600, Tick())),
        "deadline", ("A", "B", "C"),
        (ok("A"), ok("B"), ok("C")),
    ),
    Scenario(
        "deadline without quorum is extended, keeping what was accepted",
        ((10, up("A")), (20, up("B")), (3600, Tick()), (4000, up("C")), (4299, Tick()), (4300, Tick())),
        "grace", ("A", "B", "C"),
        (ok("A"), ok("B"), ok("C")),
        extensions=1, deadline=5400.0,
    ),
    Scenario(
        "extended twice while nobody reports",
        ((10, up("A")), (3600, Tick()), (5400, Tick())),
        None, ("A",), (ok("A"),),
        extensions=2, deadline=7200.0,
    ),
    Scenario(
        "re-delivery of the same update id is acknowledged again, not counted twice",
        ((10, up("A")), (20, up("A")), (30, up("B")), (40, up("A")), (500, Tick())),
        None, ("A", "B"),
        (ok("A"), ok("A"), ok("B"), ok("A")),
    ),
    Scenario(
        "a second, different update from a site is refused",
        ((10, up("A", "a1")), (20, up("A", "a2")), (30, up("B")), (40, up("C")), (340, Tick())),
        "grace", ("A", "B", "C"),
        (ok("A", "a1"), no("A", "duplicate_site", "a2"), ok("B"), ok("C")),
    ),
    Scenario(
        "stale and foreign updates are refused with the reason",
        ((10, up("A", round=0)), (20, up("B", base=OTHER)), (30, up("C", round=2)), (40, up("D", samples=0))),
        None, (),
        (no("A", "stale_round"), no("B", "wrong_base_model"), no("C", "unknown_round"), no("D", "no_samples")),
    ),
    Scenario(
        "an unknown site is refused",
        ((10, up("Z")), (20, up("A"))),
        None, ("A",),
        (no("Z", "unknown_site"), ok("A")),
    ),
    Scenario(
        "a tampered copy is refused and changes nothing",
        ((10, up("A")), (15, UpdateRejected("B", "b1", "bad_signature", 1)), (20, up("B")),
         (25, UpdateRejected("C", None, "bad_signature")), (30, up("C")), (330, Tick())),
        "grace", ("A", "B", "C"),
        (ok("A"), no("B", "bad_signature"), ok("B"), ("C", None, False, "bad_signature"), ok("C")),
    ),
    Scenario(
        "a site revoked mid-round loses its update and quorum is recounted",
        # 5 sites, K=3; C revoked: 4 sites, K=3, only A and B left, so the grace period stops
        ((10, up("A")), (20, up("B")), (30, up("C")), (40, SiteRevoked("C")), (400, Tick()),
         (410, up("C", "c2")), (500, up("D")), (799, Tick()), (800, Tick())),
        "grace", ("A", "B", "D"),
        (ok("A"), ok("B"), ok("C"), no("C", "unknown_site", "c2"), ok("D")),
    ),
    Scenario(
        "revoking the last silent site closes the round: everyone left has reported",
        ((10, up("A")), (20, up("B")), (30, up("C")), (40, up("D")), (50, SiteRevoked("E"))),
        "all_reported", ("A", "B", "C", "D"),
        (ok("A"), ok("B"), ok("C"), ok("D")),
    ),
    Scenario(
        "a site enrolled mid-round raises the quorum and must report too",
        # 6 sites: K = ceil(3.6) = 4
        ((5, SiteEnrolled("F")), (10, up("A")), (20, up("B")), (30, up("C")), (400, Tick()), (410, up("F")),
         (710, Tick())),
        "grace", ("A", "B", "C", "F"),
        (ok("A"), ok("B"), ok("C"), ok("F")),
    ),
    Scenario(
        "an accepted update re-delivered after the round closed keeps its accepted receipt",
        tuple((i, up(s)) for i, s in enumerate(SITES, 1)) + ((100, up("A")), (101, up("B", "b2"))),
        "all_reported", SITES,
        tuple(ok(s) for s in SITES) + (ok("A"), no("B", "round_closed", "b2")),
    ),
    Scenario(
        "a fixed quorum count",
        ((10, up("A")), (20, up("B")), (319, Tick()), (320, Tick())),
        "grace", ("A", "B"), (ok("A"), ok("B")),
        config=RoundConfig(quorum_count=2),
    ),
]


def run(steps, enrolled=SITES, config=RoundConfig()):
    state = start(enrolled, config)
    receipts, actions = [], []
    for now, event in steps:
        before = state.to_dict()
        state, acts = handle(state, event, float(now))
        assert RoundState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
        if acts == []:
            assert state.to_dict() == before
        actions += acts
        receipts += [(a.site, a.update_id, a.accepted, a.reason) for a in acts if isinstance(a, SendReceipt)]
    return state, receipts, actions


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
def test_scenario(sc):
    state, receipts, actions = run(sc.steps, sc.enrolled, sc.config)
    assert state.close_reason == sc.closed_by
    assert state.status == ("open" if sc.closed_by is None else "closed")
    assert tuple(a.site for a in state.accepted) == sc.accepted
    assert tuple(receipts) == sc.receipts
    assert state.extensions == sc.extensions
    assert state.deadline == sc.deadline
    closes = [a for a in actions if isinstance(a, CloseRound)]
    if sc.closed_by is None:
        assert closes == []
    else:
        assert closes == [CloseRound(1, sc.closed_by, state.accepted)]


def test_accepting_an_update_stores_then_saves_then_acknowledges():
    state = start()
    new, actions = handle(state, up("A"), 10.0)
    assert [type(a) for a in actions] == [StoreUpdate, SaveState, Ack, SendReceipt, LogEvent]
    assert actions[0] == StoreUpdate(1, "A", "a1")
    assert actions[1] == SaveState(new)
    assert actions[4].kind == "update_accepted" and actions[4].fields["samples"] == 10
    assert new.accepted[0].accepted_at == 10.0


def test_the_update_that_completes_the_round_is_saved_closed_before_the_ack():
    state = start(enrolled=("A",))
    new, actions = handle(state, up("A"), 10.0)
    assert [type(a) for a in actions] == [StoreUpdate, SaveState, Ack, SendReceipt, LogEvent, LogEvent, CloseRound]
    assert actions[1].state.status == "closed" and actions[1].state.close_reason == "all_reported"
    assert actions[5].fields == {
        "round": 1, "at": 10.0, "reason": "all_reported", "sites": ["A"], "samples": 10, "extensions": 0
    }


def test_rejections_and_redeliveries_store_and_save_nothing():
    state, _ = handle(start(), up("A"), 10.0)
    for event in (up("A"), up("B", base=OTHER), UpdateRejected("C", "c1", "too_large")):
        new, actions = handle(state, event, 20.0)
        assert new == state
        assert [type(a) for a in actions] == [Ack, SendReceipt, LogEvent]


def test_deadline_extension_reannounces_and_says_why():
    state, _ = handle(start(), up("A"), 10.0)
    new, actions = handle(state, Tick(), 3600.0)
    assert [type(a) for a in actions] == [SaveState, LogEvent, Announce]
    assert actions[2] == Announce(1, SHA, 5400.0, 3)
    assert actions[1].fields["why"] == "1 of the 3 updates needed had arrived by the deadline"
    assert new.accepted == state.accepted


def test_open_round_announces_and_next_round_starts_empty():
    state, actions = open_round(federation="clinics", round=1, model_sha256=SHA, enrolled={"A", "B"},
                                config=RoundConfig(), now=0.0)  # fmt: skip
    assert [type(a) for a in actions] == [SaveState, LogEvent, Announce]
    assert actions[2] == Announce(1, SHA, 3600.0, 2)
    state, _ = handle(state, up("A"), 1.0)
    state, _ = handle(state, up("B"), 2.0)
    assert state.status == "closed"
    nxt, actions = handle(state, OpenRound(2, OTHER), 5.0)
    assert (nxt.round, nxt.model_sha256, nxt.status) == (2, OTHER, "open")
    assert (nxt.accepted, nxt.enrolled) == ((), frozenset("AB"))
    assert nxt.deadline == 3605.0 and actions[-1] == Announce(2, OTHER, 3605.0, 2)
    _, actions = handle(nxt, up("A"), 6.0)
    assert [a for a in actions if isinstance(a, SendReceipt)] == [SendReceipt("A", "a1", 1, False, "stale_round")]


@pytest.mark.parametrize(
    "event, status",
    [
        (OpenRound(2, OTHER), "open"),  # a round is still open
        (OpenRound(1, OTHER), "closed"),  # not after the current round
        (OpenRound(2, OTHER, deadline=4.0), "closed"),  # deadline in the past
        (object(), "open"),  # not an event at all
    ],
)
def test_illegal_events_raise_and_leave_the_state_as_it_was(event, status):
    state = start(enrolled=("A",))
    if status == "closed":
        state, _ = handle(state, up("A"), 1.0)
    saved = state.to_dict()
    with pytest.raises(IllegalRoundEvent):
        handle(state, event, 5.0)
    assert state.to_dict() == saved


@pytest.mark.parametrize("now", [float("nan"), float("inf"), None, True])
def test_the_clock_must_be_a_finite_number(now):
    with pytest.raises(IllegalRoundEvent, match="now"):
        handle(start(), Tick(), now)


def test_enrolment_changes_are_idempotent():
    state = start()
    assert handle(state, SiteEnrolled("A"), 1.0) == (state, [])
    assert handle(state, SiteRevoked("Z"), 1.0) == (state, [])


def test_revocation_after_close_keeps_the_closed_round_intact():
    state = start(enrolled=("A",))
    state, _ = handle(state, up("A"), 1.0)
    new, _ = handle(state, SiteRevoked("A"), 2.0)
    assert new.accepted == state.accepted and new.enrolled == frozenset()


@pytest.mark.parametrize(
    "config, enrolled, quorum",
    [(RoundConfig(), 5, 3), (RoundConfig(), 10, 6), (RoundConfig(quorum_fraction=0.7), 10, 7), (RoundConfig(), 1, 1),
     (RoundConfig(), 0, 1), (RoundConfig(quorum_count=4), 3, 3), (RoundConfig(quorum_fraction=1.0), 4, 4)],
)
def test_quorum(config, enrolled, quorum):
    assert config.quorum(enrolled) == quorum


@pytest.mark.parametrize(
    "kwargs, field_name",
    [({"quorum_fraction": 0}, "quorum_fraction"), ({"quorum_fraction": 1.5}, "quorum_fraction"),
     ({"quorum_count": 0}, "quorum_count"), ({"quorum_count": 2.5}, "quorum_count"), ({"grace_s": -1}, "grace_s"),
     ({"round_s": 0}, "round_s"), ({"extension_s": float("nan")}, "extension_s")],
)
def test_round_config_errors_name_the_field(kwargs, field_name):
    with pytest.raises(ConfigError) as info:
        RoundConfig(**kwargs)
    assert info.value.field == field_name


def test_state_from_dict_refuses_broken_fields():
    good = handle(start(), up("A"), 10.0)[0].to_dict()
    for change, name in [({"status": "paused"}, "status"), ({"model_sha256": "xyz"}, "model_sha256"),
                         ({"enrolled": "A"}, "enrolled"), ({"config": {"grace": 1}}, "config.grace"),
                         ({"accepted": [dict(good["accepted"][0], samples="10")]}, "accepted.samples"),
                         ({"quorum_at": 5.0}, "quorum_at"), ({"deadline": None}, "deadline"),
                         ({"extensions": -1}, "extensions")]:
        with pytest.raises(RoundStateError) as info:
            RoundState.from_dict(good | change)
        assert info.value.field == name, change
    with pytest.raises(RoundStateError, match="closed_at"):
        RoundState.from_dict({k: v for k, v in good.items() if k != "closed_at"})


def test_state_refuses_two_updates_from_one_site():
    state = handle(start(), up("A"), 10.0)[0]
    with pytest.raises(RoundStateError, match="more than one"):
        RoundState.from_dict(state.to_dict() | {"accepted": state.to_dict()["accepted"] * 2})


def test_codes_are_the_shared_enums_and_keep_their_spelling():
    state, _ = handle(start(enrolled=("A",)), up("A"), 10.0)
    assert state.status is RoundStatus.CLOSED and state.close_reason is CloseReason.ALL_REPORTED
    saved = json.loads(json.dumps(state.to_dict()))
    assert (saved["status"], saved["close_reason"]) == ("closed", "all_reported")
    assert RoundState.from_dict(saved).status is RoundStatus.CLOSED
    _, actions = handle(start(), up("A", base=OTHER), 1.0)
    assert [a.reason for a in actions if isinstance(a, SendReceipt)] == [Reason.WRONG_BASE_MODEL]
    state, _ = handle(start(), up("A"), 1.0)
    _, actions = handle(state, up("A", "a2"), 2.0)
    receipt = next(a for a in actions if isinstance(a, SendReceipt))
    assert receipt.reason is RoundReason.DUPLICATE_SITE and receipt.reason == "duplicate_site"
    assert next(a for a in actions if isinstance(a, LogEvent)).fields["reason"] == "duplicate_site"


def test_round_errors_sit_under_the_broker_root():
    assert issubclass(IllegalRoundEvent, BrokerError) and issubclass(RoundStateError, BrokerError)
    assert issubclass(StoreError, BrokerError) and issubclass(CoordinatorError, BrokerError)
    assert issubclass(BrokerError, FedNCAError)


# Any sequence of events keeps the invariants; a refused message acts like a mere tick. --------------

_events = st.one_of(
    st.builds(up, st.sampled_from("ABCDEZ"), st.sampled_from(["u1", "u2"]), round=st.sampled_from([0, 1, 2]),
              base=st.sampled_from([SHA, OTHER]), samples=st.integers(0, 3)),
    st.builds(UpdateRejected, st.sampled_from("ABZ"), st.sampled_from(["u1", None]), st.just("bad_signature")),
    st.just(Tick()),
    st.builds(SiteEnrolled, st.sampled_from("ABCDEF")),
    st.builds(SiteRevoked, st.sampled_from("ABCDEF")),
    st.just(OpenRound(-1, OTHER)),  # round number filled in when the round is closed
)


def _drive(steps):
    state, now, history = start(), 0.0, []
    for dt, event in steps:
        now += dt
        if isinstance(event, OpenRound):
            event = OpenRound(state.round + 1, OTHER) if state.status == "closed" else Tick()
        state, actions = handle(state, event, now)
        history.append((event, actions, state))
    return state, history


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0, 200.0, 2000.0]), _events), max_size=30))
def test_invariants_hold_for_any_sequence(steps):
    final, history = _drive(steps)
    for event, actions, state in history:
        kinds = [type(a) for a in actions]
        if isinstance(event, (UpdateVerified, UpdateRejected)):
            assert kinds.count(Ack) == 1 and kinds.count(SendReceipt) == 1
        if SaveState in kinds:
            assert kinds.index(SaveState) < kinds.index(Ack) if Ack in kinds else True
            assert all(k is StoreUpdate for k in kinds[: kinds.index(SaveState)])
            assert actions[kinds.index(SaveState)].state == state
        if state.status == "open":
            assert {a.site for a in state.accepted} <= state.enrolled
        assert len({a.site for a in state.accepted}) == len(state.accepted)
        if CloseRound in kinds:
            assert state.status == "closed" and len(state.accepted) >= 1
    refused_as_ticks = [(dt, Tick() if isinstance(e, UpdateRejected) else e) for dt, e in steps]
    assert _drive(refused_as_ticks)[0] == final
