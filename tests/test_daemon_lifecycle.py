"""The daemon's lifecycle machine, driven directly with events and times (no clock, no I/O)."""

import pytest

from fednca_daemon import lifecycle as lc
from fednca_daemon.errors import IllegalTransition

P = lc.Policy(chunk_s=5.0, min_steps=10, deadline_margin_s=60.0, duty_cycle=0.5, threads=1, resend_s=900.0,
              backoff_s=10.0)
SHA = "a" * 64
SHA2 = "b" * 64
T0 = 1_000_000.0
DEADLINE = T0 + 3600


def kinds(actions):
    return [type(a).__name__ for a in actions]


def run(state, *steps):
    """Apply (event, now) pairs; return the final state and every action, in order."""
    actions = []
    for event, now in steps:
        state, out = lc.handle(state, event, now)
        actions += out
    return state, actions


def fresh():
    state, _ = lc.initial(P, now=T0, round=None, done_round=-1, outbox=[])
    return state


def training(steps=0, planned=100, now=T0):
    """A state with a ready, idle trainer of round 1 (after its start-up rest)."""
    s, _ = run(fresh(), (lc.Announced(1, DEADLINE, SHA), now),
               (lc.WorkerReady(1, steps, planned, cpu_s=0.0, wall_s=0.0), now))
    return s


def test_an_announcement_starts_a_trainer_and_its_ready_message_starts_a_chunk():
    s, out = lc.handle(fresh(), lc.Announced(1, DEADLINE, SHA), T0)
    assert out[0] == lc.StartWorker(1)
    assert s.worker == lc.Worker.STARTING and s.phase == lc.Phase.TRAINING
    assert lc.Telemetry() in out  # idle -> training is a state change
    s, out = lc.handle(s, lc.WorkerReady(1, 0, 100, cpu_s=0.0, wall_s=2.0), T0 + 2)
    assert lc.RunChunk(5.0) in out and lc.PingWatchdog() in out
    assert s.worker == lc.Worker.BUSY and (s.steps, s.planned) == (0, 100)


def test_no_watchdog_ping_while_a_trainer_starts_or_runs_a_chunk():
    s, _ = lc.handle(fresh(), lc.Announced(1, DEADLINE, SHA), T0)
    assert not s.may_ping_watchdog  # starting
    s, _ = lc.handle(s, lc.WorkerReady(1, 0, 100, 0.0, 0.0), T0)
    assert s.worker == lc.Worker.BUSY and not s.may_ping_watchdog
    s, out = lc.handle(s, lc.ChunkDone(1, 10, 100, cpu_s=5.0, wall_s=5.0), T0 + 5)
    assert lc.PingWatchdog() in out and s.may_ping_watchdog  # resting between chunks


@pytest.mark.parametrize("duty, cpu, wall, rest", [
    (0.5, 5.0, 5.0, 5.0),    # t (1-d)/d
    (0.25, 2.0, 2.0, 6.0),
    (1.0, 5.0, 5.0, 0.0),    # no rest: the next chunk starts at once
    (0.5, 2.0, 5.0, 0.0),    # slowed down by other programs: it used less than its share
])
def test_after_a_chunk_the_daemon_rests_as_the_cpu_budget_says(duty, cpu, wall, rest):
    p = lc.Policy(chunk_s=5.0, min_steps=10, deadline_margin_s=60.0, duty_cycle=duty)
    s, _ = lc.initial(p, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[])
    s, _ = run(s, (lc.WorkerReady(1, 0, 100, 0.0, 0.0), T0))
    s, out = lc.handle(s, lc.ChunkDone(1, 10, 100, cpu_s=cpu, wall_s=wall), T0 + wall)
    if rest == 0:
        assert lc.RunChunk(5.0) in out and s.rest_until is None
    else:
        assert not any(isinstance(a, lc.RunChunk) for a in out)
        assert s.rest_until == pytest.approx(T0 + wall + rest)
        s, out = lc.handle(s, lc.Tick(), T0 + wall + rest - 0.01)
        assert not any(isinstance(a, lc.RunChunk) for a in out)
        s, out = lc.handle(s, lc.Tick(), T0 + wall + rest)
        assert lc.RunChunk(5.0) in out


def test_a_wall_clock_step_back_does_not_lengthen_a_rest():
    s = training()
    s, _ = lc.handle(s, lc.ChunkDone(1, 10, 100, cpu_s=5.0, wall_s=5.0), T0 + 5)
    assert s.rest_until == T0 + 10
    s, _ = lc.handle(s, lc.Tick(), T0 - 3600)  # the clock jumped an hour back
    assert s.rest_until == pytest.approx(T0 - 3600 + 5)


def test_planned_steps_done_submit_a_full_update_and_let_the_trainer_go():
    s = training()
    s, out = lc.handle(s, lc.ChunkDone(1, 100, 100, cpu_s=1.0, wall_s=1.0), T0 + 1)
    assert kinds(out)[:3] == ["PingWatchdog", "Submit", "StopWorker"]
    assert lc.Submit(1, partial=False) in out and lc.StopWorker(interrupt=False) in out
    s, out = lc.handle(s, lc.UpdateStored(1, "u1"), T0 + 1)
    assert s.phase == lc.Phase.SUBMITTED and [p.update_id for p in s.outbox] == ["u1"]
    s, out = lc.handle(s, lc.WorkerExited(None), T0 + 2)
    assert s.worker == lc.Worker.NONE and s.failures == 0 and not any(isinstance(a, lc.StartWorker) for a in out)


def test_at_the_deadline_partial_work_is_submitted_only_from_min_steps_on():
    due = DEADLINE - P.deadline_margin_s
    s = training()
    s, out = lc.handle(s, lc.ChunkDone(1, 9, 100, cpu_s=0.0, wall_s=0.0), due)
    assert not any(isinstance(a, lc.Submit) for a in out)  # 9 < min_steps: keep training
    assert lc.RunChunk(5.0) in out
    s, out = lc.handle(s, lc.ChunkDone(1, 10, 100, cpu_s=0.0, wall_s=0.0), due + 1)
    assert lc.Submit(1, partial=True) in out


def test_the_last_chunk_before_the_deadline_is_cut_to_the_time_left():
    s, _ = lc.initial(P, now=T0, round=lc.RoundInfo(1, T0 + 62, SHA), done_round=-1, outbox=[])
    s, out = lc.handle(s, lc.WorkerReady(1, 0, 100, 0.0, 0.0), T0)
    assert lc.RunChunk(2.0) in out  # 62 s deadline - 60 s margin


def test_a_deadline_extension_keeps_the_progress():
    s = training(steps=40)
    s, _ = lc.handle(s, lc.Announced(1, DEADLINE + 1800, SHA), T0 + 1)
    assert s.round.deadline == DEADLINE + 1800 and s.steps == 40 and s.worker != lc.Worker.STOPPING


def test_a_newer_round_interrupts_the_old_trainer_and_drops_updates_of_closed_rounds():
    s = training(steps=40)  # chunk running
    s, out = lc.handle(s, lc.Announced(2, DEADLINE, SHA2), T0 + 1)
    assert lc.StopWorker(interrupt=True) in out and s.worker == lc.Worker.STOPPING
    s, out = lc.handle(s, lc.ChunkDone(1, 45, 100, 1.0, 1.0), T0 + 2)
    assert s.steps == 0, "progress of the old round must not count for the new one"
    s, out = lc.handle(s, lc.WorkerExited(None), T0 + 2)
    assert s.failures == 0 and s.rest_until == T0 + 3  # the CPU it used still earns its rest
    s, out = lc.handle(s, lc.Tick(), T0 + 3)
    assert lc.StartWorker(2) in out


def test_an_update_of_a_round_that_closed_leaves_the_outbox():
    s, out = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[(1, "u1")])
    assert out[0] == lc.Publish(1, "u1") and s.phase == lc.Phase.SUBMITTED
    s, out = lc.handle(s, lc.Announced(2, DEADLINE, SHA2), T0)
    assert lc.DropUpdate(1, "u1") in out and s.outbox == () and lc.StartWorker(2) in out


def test_older_announcements_are_ignored():
    s = training(steps=40)
    s2, out = lc.handle(s, lc.Announced(0, DEADLINE, SHA2), T0)
    assert s2 == s and out == []


def test_a_receipt_is_saved_before_the_update_leaves_the_outbox_and_repeats_are_ignored():
    s = training()
    s, _ = run(s, (lc.ChunkDone(1, 100, 100, 0.0, 0.0), T0), (lc.UpdateStored(1, "u1"), T0),
               (lc.WorkerExited(None), T0))
    s, out = lc.handle(s, lc.ReceiptArrived(1, "u1", True), T0 + 5)
    assert kinds(out)[:2] == ["SaveDone", "DropUpdate"] and out[0] == lc.SaveDone(1, "accepted")
    assert s.done_round == 1 and s.phase == lc.Phase.IDLE and s.last_receipt == "accepted"
    s2, out = lc.handle(s, lc.ReceiptArrived(1, "u1", True), T0 + 6)
    assert s2 == s and out == []
    s3, out = lc.handle(s, lc.ReceiptArrived(1, "someone-else", True), T0 + 6)
    assert s3 == s and out == []


def test_a_rejected_update_ends_the_round_with_its_reason():
    s, _ = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[(1, "u1")])
    s, out = lc.handle(s, lc.ReceiptArrived(1, "u1", False, "round_closed"), T0)
    assert out[0] == lc.SaveDone(1, "round_closed") and s.done_round == 1 and s.last_receipt == "round_closed"
    assert not any(isinstance(a, lc.StartWorker) for a in out)


def test_a_restart_republishes_waiting_updates_and_drops_those_already_answered():
    s, out = lc.initial(P, now=T0, round=lc.RoundInfo(3, DEADLINE, SHA), done_round=2,
                        outbox=[(2, "old"), (3, "new"), (1, "older")])
    assert out[:3] == [lc.DropUpdate(1, "older"), lc.DropUpdate(2, "old"), lc.Publish(3, "new")]
    assert [p.update_id for p in s.outbox] == ["new"] and s.worker == lc.Worker.NONE


def test_a_restart_after_the_last_chunk_submits_without_a_trainer():
    s, out = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[],
                        steps=100, planned=100)
    assert lc.Submit(1, partial=False) in out and not any(isinstance(a, lc.StartWorker) for a in out)


def test_a_restart_of_a_finished_round_does_nothing():
    s, out = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=1, outbox=[])
    assert s.phase == lc.Phase.IDLE and kinds(out) == ["Telemetry"]


def test_updates_without_a_receipt_are_published_again_after_resend_s():
    # A long round (10 h left): a tenth of it is more than resend_s, so resend_s is the bound.
    s, _ = lc.initial(P, now=T0, round=lc.RoundInfo(1, T0 + 36000, SHA), done_round=-1, outbox=[(1, "u1")])
    assert lc.next_wakeup(s, T0) == T0 + P.resend_s
    s, out = lc.handle(s, lc.Tick(), T0 + P.resend_s - 1)
    assert out == []
    s, out = lc.handle(s, lc.Tick(), T0 + P.resend_s)
    assert out == [lc.Publish(1, "u1")] and s.outbox[0].sent_at == T0 + P.resend_s


def test_a_closed_gate_lets_the_chunk_finish_then_releases_the_trainer_and_reopening_restarts_it():
    s = training()  # chunk running
    s, out = lc.handle(s, lc.GatesChanged(False, ("temperature 81.0 C",)), T0)
    assert out == [lc.Telemetry()] and s.phase == lc.Phase.PAUSED and s.worker == lc.Worker.BUSY
    s, out = lc.handle(s, lc.ChunkDone(1, 10, 100, 0.0, 0.0), T0 + 5)
    assert lc.StopWorker(interrupt=False) in out and not any(isinstance(a, lc.RunChunk) for a in out)
    s, out = lc.handle(s, lc.WorkerExited(None), T0 + 6)
    assert not any(isinstance(a, lc.StartWorker) for a in out) and s.steps == 10
    s, out = lc.handle(s, lc.GatesChanged(True), T0 + 100)
    assert lc.StartWorker(1) in out and s.phase == lc.Phase.TRAINING


def test_a_pause_at_the_deadline_still_submits_enough_partial_work():
    s = training()
    s, _ = run(s, (lc.ChunkDone(1, 20, 100, 0.0, 0.0), T0), (lc.GatesChanged(False, ("battery 10 %",)), T0))
    s, _ = run(s, (lc.WorkerExited(None), T0))
    s, out = lc.handle(s, lc.Tick(), DEADLINE)
    assert lc.Submit(1, partial=True) in out


def test_a_failing_trainer_is_restarted_after_a_growing_backoff():
    s, _ = lc.handle(fresh(), lc.Announced(1, DEADLINE, SHA), T0)
    s, out = lc.handle(s, lc.WorkerExited("dataset folder not found"), T0)
    assert s.phase == lc.Phase.BACKOFF and s.error == "dataset folder not found" and s.rest_until == T0 + 10
    s, out = lc.handle(s, lc.Tick(), T0 + 10)
    assert lc.StartWorker(1) in out
    s, out = lc.handle(s, lc.WorkerExited("again"), T0 + 11)
    assert s.rest_until == T0 + 11 + 20 and s.failures == 2
    s, out = run(s, (lc.Tick(), T0 + 31), (lc.WorkerReady(1, 0, 100, 0.0, 0.0), T0 + 32),
                 (lc.ChunkDone(1, 5, 100, 0.0, 0.0), T0 + 33))
    assert s.failures == 0 and s.error is None


def test_a_submit_failure_relearns_the_progress_from_a_new_trainer():
    s, out = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[],
                        steps=100, planned=100)
    s, out = lc.handle(s, lc.SubmitFailed("checkpoint unreadable"), T0)
    assert s.planned is None and s.phase == lc.Phase.BACKOFF
    s, out = lc.handle(s, lc.Tick(), T0 + 10)
    assert lc.StartWorker(1) in out


def test_stop_interrupts_a_running_chunk_and_exits_once_the_trainer_is_gone():
    s = training()
    s, out = lc.handle(s, lc.StopRequested(), T0)
    assert lc.StopWorker(interrupt=True) in out and lc.Exit() not in out and s.phase == lc.Phase.STOPPING
    s, out = lc.handle(s, lc.ChunkDone(1, 12, 100, 0.0, 0.0), T0 + 0.5)
    assert not any(isinstance(a, (lc.RunChunk, lc.Submit)) for a in out)
    s, out = lc.handle(s, lc.WorkerExited(None), T0 + 0.6)
    assert out[-1] == lc.Exit() and s.exited
    s, out = lc.handle(s, lc.Tick(), T0 + 1)
    assert lc.Exit() not in out  # once


def test_stop_while_idle_exits_at_once():
    s, out = lc.handle(fresh(), lc.StopRequested(), T0)
    assert lc.Exit() in out


def test_illegal_events_and_times_raise_and_change_nothing():
    s = fresh()
    with pytest.raises(IllegalTransition):
        lc.handle(s, "announce", T0)  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition):
        lc.handle(s, lc.Tick(), float("nan"))


def test_events_of_a_trainer_for_another_round_do_not_count():
    s = training(steps=0)
    s, _ = lc.handle(s, lc.ChunkDone(7, 99, 100, 0.0, 0.0), T0)
    assert s.steps == 0


def test_a_round_announced_after_its_deadline_is_not_trained():
    s, out = lc.handle(fresh(), lc.Announced(9, T0 - 1, SHA), T0)
    assert out[0] == lc.SaveDone(9, lc.PAST_DEADLINE) and s.done_round == 9 and s.phase == lc.Phase.IDLE
    assert not any(isinstance(a, lc.StartWorker) for a in out)
    s = training(steps=30)  # an extension to a time already past changes nothing of the kind
    s, out = lc.handle(s, lc.Announced(1, T0 - 5, SHA), T0)
    assert s.done_round == -1 and not any(isinstance(a, lc.SaveDone) for a in out)
    s, out = lc.handle(s, lc.ChunkDone(1, 31, 100, 0.0, 0.0), T0)
    assert lc.Submit(1, partial=True) in out


def test_a_device_that_starts_hot_starts_no_trainer():
    s, out = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[],
                        gates_open=False, gate_reasons=("temperature 90.0 C",))
    assert s.phase == lc.Phase.PAUSED and not any(isinstance(a, lc.StartWorker) for a in out)


def test_a_wakeup_time_already_past_is_not_waited_for_again():
    """Past the deadline margin, paused with too few steps: the deadline is no wake-up any more
    (waiting for a past time would make the shell spin)."""
    s = training()
    margin_time = s.round.deadline - P.deadline_margin_s
    assert lc.next_wakeup(s, margin_time - 1) == margin_time
    later = lc.next_wakeup(s, margin_time + 1)
    assert later is None or later > margin_time + 1


@pytest.mark.parametrize("event", [lc.WorkerReady(1, 0, 100, 0.0, 0.0), lc.ChunkDone(1, 5, 100, 0.0, 0.0),
                                   lc.WorkerExited(None)])
def test_a_trainer_event_without_a_trainer_is_illegal_and_changes_nothing(event):
    s = fresh()  # no round, no trainer
    before = s
    with pytest.raises(IllegalTransition, match="trainer is none"):
        lc.handle(s, event, T0)
    assert s == before and s.worker == lc.Worker.NONE


def test_a_chunk_report_while_no_chunk_runs_is_illegal():
    s, _ = lc.handle(fresh(), lc.Announced(1, DEADLINE, SHA), T0)  # trainer starting
    with pytest.raises(IllegalTransition, match="ChunkDone cannot happen while the trainer is starting"):
        lc.handle(s, lc.ChunkDone(1, 5, 100, 0.0, 0.0), T0)


def test_the_table_accepts_every_non_trainer_event_in_every_trainer_state():
    for worker in lc.Worker:
        for event in (lc.Announced, lc.GatesChanged, lc.UpdateStored, lc.SubmitFailed, lc.ReceiptArrived, lc.Tick,
                      lc.StopRequested):
            assert (worker, event) in lc.TRANSITIONS


def test_a_trainer_that_fails_on_its_way_out_counts_as_a_failure():
    s = training()  # a chunk of round 1 runs
    s, out = lc.handle(s, lc.Announced(2, DEADLINE, SHA2), T0)
    assert s.worker == lc.Worker.STOPPING and lc.StopWorker(interrupt=True) in out
    s, _ = lc.handle(s, lc.WorkerExited("killed by signal 9"), T0 + 1)
    assert s.worker == lc.Worker.NONE and s.failures == 1 and s.error == "killed by signal 9"


def test_an_update_without_a_receipt_is_sent_again_within_a_tenth_of_the_time_left_doubling_up_to_resend_s():
    s, _ = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[(1, "u1")])
    assert lc.next_wakeup(s, T0) == T0 + 360  # a tenth of the hour left
    s, out = lc.handle(s, lc.Tick(), T0 + 359)
    assert out == []
    s, out = lc.handle(s, lc.Tick(), T0 + 360)
    assert out == [lc.Publish(1, "u1")] and s.outbox[0].resends == 1
    # sent again at T0 + 360 with 3240 s left: 324 s, doubled once
    assert lc.next_wakeup(s, T0 + 360) == T0 + 360 + 648
    s, out = lc.handle(s, lc.Tick(), T0 + 360 + 648)
    assert out == [lc.Publish(1, "u1")]
    assert lc.next_wakeup(s, T0 + 1008) == T0 + 1008 + 900  # never past resend_s


def test_after_the_deadline_an_update_without_a_receipt_is_sent_again_after_30_s():
    s, _ = lc.initial(P, now=DEADLINE + 5, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[(1, "u1")])
    assert lc.next_wakeup(s, DEADLINE + 5) == DEADLINE + 5 + lc.RESEND_MIN_S


def test_a_damaged_stored_update_makes_the_round_need_work_again():
    s, _ = lc.initial(P, now=T0, round=lc.RoundInfo(1, DEADLINE, SHA), done_round=-1, outbox=[(1, "u1")])
    assert s.phase == lc.Phase.SUBMITTED
    s, out = lc.handle(s, lc.UpdateLost(1, "u1", "outbox entry damaged"), T0)
    assert s.outbox == () and s.error == "outbox entry damaged" and s.phase == lc.Phase.TRAINING
    assert lc.StartWorker(1) in out and not any(isinstance(a, lc.DropUpdate) for a in out)
    s2, out = lc.handle(s, lc.UpdateLost(1, "u1", "again"), T0)
    assert s2 == s and out == []
