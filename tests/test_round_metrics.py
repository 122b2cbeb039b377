"""The sites' own measurements (test Dice) reach the round log: each accepted update's line
carries its site's metrics, and the aggregated round carries their mean over the sites."""

import pytest

from fednca_broker.roundlog import RoundAggregatedRecord, UpdateAcceptedRecord, decode, encode
from test_coordinator import SITES, Federation, world  # noqa: F401  (world is a fixture)

DICE = {"a": 0.5, "b": 0.7, "c": 0.9}


def test_accepted_lines_carry_the_sites_metrics_and_the_round_their_mean(world, tmp_path):  # noqa: F811
    fed = Federation(world, tmp_path).start()
    for site in SITES:
        fed.send(site, world["update"](site, metrics={"dice_global": DICE[site], "train_loss": 0.25}))
    fed.clock.now += 5
    fed.coordinator.step()
    log = fed.store.read_log()
    accepted = {r.site: dict(r.metrics) for r in log if isinstance(r, UpdateAcceptedRecord)}
    assert accepted == {s: {"dice_global": DICE[s], "train_loss": 0.25} for s in SITES}
    summary = next(r for r in log if isinstance(r, RoundAggregatedRecord))
    assert summary.metrics_mean == {"dice_global": pytest.approx(0.7), "train_loss": 0.25}


def test_a_restart_keeps_the_metrics_of_updates_accepted_before_it(world, tmp_path):  # noqa: F811
    first = Federation(world, tmp_path).start()
    first.send("a", world["update"]("a", metrics={"dice_global": 0.2}))
    first.coordinator.step()
    first.client.kill()
    second = Federation(world, tmp_path, broker=first.broker, clock=first.clock).start()
    for site in ("b", "c"):
        second.send(site, world["update"](site, metrics={"dice_global": 0.5}))
    second.coordinator.step()
    summary = next(r for r in second.store.read_log() if isinstance(r, RoundAggregatedRecord))
    assert summary.metrics_mean == {"dice_global": pytest.approx(0.4)}


def test_old_lines_without_metrics_still_decode_and_are_written_as_before():
    old = {"kind": "update_accepted", "at": 1.0, "round": 1, "site": "a", "update_id": "x", "samples": 1,
           "steps": 1, "partial": False}
    record = decode(old)
    assert record.metrics == {} and encode(record) == old
    with pytest.raises(ValueError):
        decode({**old, "metrics": {"dice": "high"}})


def test_the_coordinators_log_lines_show_deadlines_as_local_dates(world, tmp_path, caplog):  # noqa: F811
    import time

    caplog.set_level("INFO", logger="fednca.coordinator")
    fed = Federation(world, tmp_path).start()
    deadline = fed.coordinator.state.deadline
    opened = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("round_opened"))
    assert f"deadline={time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(deadline))}" in opened
    assert str(int(deadline)) not in opened
