"""The daemon in buffered asynchronous rounds: an update sent for an older round keeps going while
the coordinator still counts it, and the daemon trains the newest round meanwhile."""

from fednca_daemon import lifecycle as lc

P = lc.Policy(chunk_s=5.0, min_steps=10, deadline_margin_s=60.0, duty_cycle=0.5, threads=1, resend_s=900.0,
              backoff_s=10.0)
SHA, SHA2, SHA3, SHA4 = "a" * 64, "b" * 64, "c" * 64, "d" * 64
T0 = 1_000_000.0
DEADLINE = T0 + 3600


def waiting(max_staleness):
    """Round 1 announced with ``max_staleness``, its update stored and waiting for a receipt."""
    s, _ = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA, max_staleness), done_round=-1,
                      outbox=[(1, "u1")])
    return s


def test_a_newer_model_keeps_the_older_update_going_and_starts_training_from_it():
    s, out = lc.handle(waiting(2), lc.Announced(2, DEADLINE, SHA2, 2), T0 + 1)
    assert not any(isinstance(a, lc.DropUpdate) for a in out)
    assert [p.update_id for p in s.outbox] == ["u1"] and lc.StartWorker(2) in out
    assert s.needs_work  # the newest round has no update yet: train it
    s, out = lc.handle(s, lc.Tick(), T0 + 1 + lc.RESEND_MIN_S)
    assert lc.Publish(1, "u1") in out  # no receipt yet: sent again, the same update id


def test_an_update_past_the_announced_staleness_leaves_the_outbox():
    s, _ = lc.handle(waiting(1), lc.Announced(2, DEADLINE, SHA2, 1), T0 + 1)
    assert [p.update_id for p in s.outbox] == ["u1"]
    s, out = lc.handle(s, lc.Announced(3, DEADLINE, SHA3, 1), T0 + 2)
    assert lc.DropUpdate(1, "u1") in out and s.outbox == ()


def test_without_max_staleness_a_newer_round_drops_it_as_before():
    s, out = lc.handle(waiting(0), lc.Announced(2, DEADLINE, SHA2), T0 + 1)
    assert lc.DropUpdate(1, "u1") in out and s.outbox == ()


def test_the_receipt_of_the_older_update_does_not_end_the_newest_round():
    s, _ = lc.handle(waiting(2), lc.Announced(2, DEADLINE, SHA2, 2), T0 + 1)
    s, out = lc.handle(s, lc.ReceiptArrived(1, "u1", True), T0 + 2)
    assert lc.SaveDone(1, "accepted") in out and lc.DropUpdate(1, "u1") in out
    assert s.done_round == 1 and s.needs_work and s.round.round == 2
    s, out = lc.handle(waiting(2), lc.ReceiptArrived(1, "u1", False, "too_stale"), T0 + 2)
    assert s.outbox == () and s.last_receipt == "too_stale"


def test_an_update_refused_as_a_second_one_in_the_buffer_waits_for_the_next_model_then_goes_again():
    s, out = lc.handle(waiting(2), lc.ReceiptArrived(1, "u1", False, "duplicate_site"), T0 + 2)
    assert not any(isinstance(a, (lc.DropUpdate, lc.SaveDone)) for a in out)
    assert [(p.update_id, p.held) for p in s.outbox] == [("u1", True)] and s.done_round == -1
    assert not s.needs_work  # its work is not lost, so the round is not trained again
    s, out = lc.handle(s, lc.Tick(), T0 + 2 + 10 * P.resend_s)
    assert lc.Publish(1, "u1") not in out  # no resending into the buffer that refused it
    assert lc.next_wakeup(s, T0 + 3) is None or lc.next_wakeup(s, T0 + 3) >= DEADLINE - P.deadline_margin_s
    s, out = lc.handle(s, lc.Announced(2, DEADLINE, SHA2, 2), T0 + 20)
    assert lc.Publish(1, "u1") in out and [(p.update_id, p.held) for p in s.outbox] == [("u1", False)]
    s, out = lc.handle(s, lc.ReceiptArrived(1, "u1", True), T0 + 21)
    assert lc.SaveDone(1, "accepted") in out and s.outbox == ()


def test_in_synchronous_rounds_a_duplicate_refusal_still_ends_the_update():
    s, out = lc.handle(waiting(0), lc.ReceiptArrived(1, "u1", False, "duplicate_site"), T0 + 2)
    assert lc.DropUpdate(1, "u1") in out and s.outbox == ()


def test_an_update_stored_after_a_newer_model_came_is_kept_while_it_counts():
    s, _ = lc.initial(P, now=T0, round=lc.RoundInfo(3, DEADLINE, SHA3, 1), done_round=-1, outbox=[])
    s, out = lc.handle(s, lc.UpdateStored(2, "late"), T0)
    assert [p.update_id for p in s.outbox] == ["late"] and not any(isinstance(a, lc.DropUpdate) for a in out)
    s, out = lc.handle(s, lc.UpdateStored(1, "older"), T0)
    assert lc.DropUpdate(1, "older") in out and [p.update_id for p in s.outbox] == ["late"]


def test_a_restart_keeps_the_older_updates_that_still_count():
    s, out = lc.initial(P, now=T0, round=lc.RoundInfo(4, DEADLINE, SHA4, 2), done_round=1,
                        outbox=[(1, "done"), (2, "old"), (3, "recent")])
    assert out[:3] == [lc.DropUpdate(1, "done"), lc.Publish(2, "old"), lc.Publish(3, "recent")]
    assert [p.update_id for p in s.outbox] == ["old", "recent"] and s.needs_work


def test_the_announcement_tells_buffered_rounds_and_stays_as_before_otherwise():
    from test_wire_tamper import make_announcement, open_announcement

    assert open_announcement(make_announcement(max_staleness=4)).header.max_staleness == 4
    plain = make_announcement()
    assert open_announcement(plain).header.max_staleness is None
    assert b"max_staleness" not in plain  # a synchronous round's announcement is unchanged


def training(max_staleness, steps, planned=100):
    """A trainer of round 1 that has done ``steps`` steps, resting between chunks."""
    s, _ = lc.initial(P, now=T0, round=None, done_round=-1, outbox=[])
    for event in (lc.Announced(1, DEADLINE, SHA, max_staleness), lc.WorkerReady(1, 0, planned, 0.0, 0.0),
                  lc.ChunkDone(1, steps, planned, 0.0, 0.0)):
        s, _ = lc.handle(s, event, T0)
    return s


def test_a_newer_model_submits_the_interrupted_round_as_a_partial_update_then_trains_the_newest():
    s, out = lc.handle(training(2, steps=60), lc.Announced(2, DEADLINE, SHA2, 2), T0 + 1)
    assert out[0] == lc.Submit(1, partial=True) and any(isinstance(a, lc.StopWorker) for a in out)
    assert s.submitting and s.round.round == 2 and s.steps == 0
    s, out = lc.handle(s, lc.UpdateStored(1, "u1"), T0 + 2)
    assert [p.round for p in s.outbox] == [1] and not s.submitting
    s, out = lc.handle(s, lc.ChunkDone(1, 45, 100, 0.0, 0.0), T0 + 2)  # the interrupted chunk
    assert s.steps == 0  # its steps are not round 2's
    s, out = lc.handle(s, lc.WorkerExited(None), T0 + 2)
    assert lc.StartWorker(2) in out


def test_too_little_work_or_a_synchronous_round_is_dropped_as_before():
    for state in (training(2, steps=5), training(2, steps=49), training(0, steps=60)):
        s, out = lc.handle(state, lc.Announced(2, DEADLINE, SHA2, state.round.max_staleness), T0 + 1)
        assert not any(isinstance(a, lc.Submit) for a in out) and not s.submitting


def test_a_re_announcement_of_the_same_round_keeps_the_round_before_as_previous(tmp_path):
    # The interrupted work of round 1 is submitted against round 1's announcement ("previous"): a
    # deadline extension of round 2 (announced again) must not make round 2 its own "previous".
    import numpy as np
    from daemon_support import TINY_MODEL, TINY_TRAIN, Federation, tiny_weights
    from fednca.wire_round import make_announcement
    from fednca_daemon.coordinator_inbox import CoordinatorInbox
    from fednca_daemon.outbox import StateFolder

    keys = Federation(tmp_path)
    inbox = CoordinatorInbox(federation="fed", site="site-a", coordinator=keys.coordinator.public,
                             folder=StateFolder(path=tmp_path / "state"))
    inbox.folder.open()
    weights = tiny_weights()

    def announce(rnd: int, deadline: int, tensors) -> bytes:
        return make_announcement(federation="fed", round=rnd, deadline=deadline, quorum=1, train=TINY_TRAIN,
                                 model=TINY_MODEL, tensors=tensors, signing_key=keys.coordinator.signing)

    state = lc.State(policy=P)
    wall = 1_900_000_000.0
    assert inbox.announcement_arrived(announce(1, 2_000_000_000, weights), state=state, now=wall, wall=wall, live=True)
    newer = {k: np.asarray(v) + 0.01 for k, v in weights.items()}
    assert inbox.announcement_arrived(announce(2, 2_000_000_000, newer), state=state, now=wall, wall=wall, live=True)
    assert inbox.previous.header.round == 1
    assert inbox.announcement_arrived(announce(2, 2_000_003_600, newer), state=state, now=wall, wall=wall, live=True)
    assert inbox.announcement.header.deadline == 2_000_003_600 and inbox.previous.header.round == 1
