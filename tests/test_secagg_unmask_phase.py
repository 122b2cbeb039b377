"""The unmasking phase's state machine (broker/unmask_phase.py), driven directly with events."""

from __future__ import annotations

import pytest

from fednca_broker import unmask_phase as up
from fednca_broker.errors import IllegalRoundEvent


def phase(*, missing=(), threshold=2) -> up.UnmaskState:
    return up.UnmaskState(round=4, survivors=("a", "b", "c"), missing=missing, threshold=threshold, began_at=100.0,
                          timeout_s=600.0, resend_s=60.0)


def test_begin_asks_every_silent_survivor_and_an_answer_is_stored_before_it_is_acknowledged():
    s, actions = up.handle(phase(), up.Begin(), 100.0)
    assert actions == [up.Request(("a", "b", "c"))] and s.asked_at == 100.0
    s, actions = up.handle(s, up.AnswerArrived("b"), 101.0)
    assert actions == [up.StoreAnswer("b"), up.Ack("b")] and s.answered == {"b"}
    again, actions = up.handle(s, up.AnswerArrived("b"), 102.0)
    assert actions == [up.Ack("b")] and again is s  # a re-delivery is only acknowledged
    s, actions = up.handle(s, up.AnswerArrived("a"), 103.0)  # 2 of 3 answered, t = 2, nobody missing
    assert actions == [up.StoreAnswer("a"), up.Ack("a"), up.Decode()] and s.done
    assert up.handle(s, up.AnswerArrived("c"), 104.0) == (s, [up.Ack("c")])


def test_with_a_site_missing_every_survivor_must_answer():
    s, _ = up.handle(phase(missing=("d",)), up.Begin(), 100.0)
    for site in ("a", "b"):
        s, actions = up.handle(s, up.AnswerArrived(site), 101.0)
        assert up.Decode() not in actions
    s, actions = up.handle(s, up.AnswerArrived("c"), 102.0)
    assert actions[-1] == up.Decode()


def test_a_stranger_is_refused_silent_sites_are_asked_again_and_the_round_is_given_up_at_the_deadline():
    s, _ = up.handle(phase(missing=("d",)), up.Begin(), 100.0)
    same, actions = up.handle(s, up.AnswerArrived("d"), 101.0)
    assert same is s and isinstance(actions[0], up.Refuse) and actions[1] == up.Ack("d")
    s, _ = up.handle(s, up.AnswerArrived("a"), 110.0)
    assert up.handle(s, up.Tick(), 159.0) == (s, [])
    s, actions = up.handle(s, up.Tick(), 160.0)
    assert actions == [up.Request(("b", "c"))]
    s, actions = up.handle(s, up.Tick(), 700.0)
    assert s.done and isinstance(actions[0], up.GiveUp) and "only a survivor can name" in actions[0].why


def test_illegal_states_are_refused():
    with pytest.raises(IllegalRoundEvent):
        up.UnmaskState(round=1, survivors=("a",), missing=("a",), threshold=1, began_at=0, timeout_s=1, resend_s=1)
    with pytest.raises(IllegalRoundEvent):
        up.UnmaskState(round=1, survivors=(), missing=("a",), threshold=1, began_at=0, timeout_s=1, resend_s=1)
    with pytest.raises(IllegalRoundEvent):
        up.handle(phase(), object(), 0.0)  # type: ignore[arg-type]


def test_fewer_survivors_than_the_threshold_are_never_unmasked():
    s, actions = up.handle(phase(threshold=4), up.Begin(), 100.0)
    assert s.done and isinstance(actions[0], up.GiveUp) and "fewer than the threshold 4" in actions[0].why


def test_a_lone_survivor_is_given_up_even_with_a_threshold_of_one():
    state = up.UnmaskState(round=1, survivors=("a",), missing=("b",), threshold=1, began_at=0, timeout_s=1, resend_s=1)
    after, actions = up.handle(state, up.Begin(), 0.0)
    assert after.done and len(actions) == 1 and isinstance(actions[0], up.GiveUp)
