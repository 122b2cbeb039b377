"""CPU budget arithmetic and the gates with their hysteresis: pure functions, tiny literal inputs."""

from dataclasses import dataclass

import pytest

from fednca_daemon.budget import MAX_REST_S, backoff_seconds, measured_share, rest_seconds, share
from fednca_daemon.gates import GateState, Readings, WindowError, evaluate, in_window, parse_window


@pytest.mark.parametrize("cpu, wall, duty, threads, rest", [
    (1.0, 1.0, 0.25, 1, 3.0),   # t (1-d)/d
    (1.0, 1.0, 0.5, 1, 1.0),
    (1.0, 1.0, 1.0, 1, 0.0),
    (2.0, 1.0, 0.5, 2, 1.0),    # two busy threads: budget is 0.5 x 2 cores
    (0.5, 1.0, 0.5, 1, 0.0),    # slowed by others: already below its share
    (0.0, 3.0, 0.5, 1, 0.0),
])
def test_rest_after_work(cpu, wall, duty, threads, rest):
    assert rest_seconds(cpu_s=cpu, wall_s=wall, duty_cycle=duty, threads=threads) == pytest.approx(rest)


def test_work_plus_rest_uses_exactly_the_configured_share():
    for duty in (0.1, 0.25, 0.5, 0.8):
        cpu, wall = 3.7, 4.1
        rest = rest_seconds(cpu_s=cpu, wall_s=wall, duty_cycle=duty)
        assert measured_share(cpu_s=cpu, wall_s=wall + rest) == pytest.approx(share(duty_cycle=duty, threads=1))


def test_rest_is_bounded_and_inputs_are_checked():
    assert rest_seconds(cpu_s=1e6, wall_s=0.0, duty_cycle=0.01) == MAX_REST_S
    for bad in (dict(cpu_s=-1.0, wall_s=1.0), dict(cpu_s=float("nan"), wall_s=1.0)):
        with pytest.raises(ValueError):
            rest_seconds(duty_cycle=0.5, **bad)
    for duty in (0.0, 1.5):
        with pytest.raises(ValueError):
            share(duty_cycle=duty, threads=1)


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_seconds(failures=n, base_s=10.0) for n in range(5)] == [0.0, 10.0, 20.0, 40.0, 80.0]
    assert backoff_seconds(failures=40, base_s=10.0) == 3600.0


# ------------------------------------------------------------------------------------------ gates


@dataclass(frozen=True)
class G:
    max_temperature_c: float | None = 75.0
    temperature_hysteresis_c: float = 5.0
    min_battery_percent: float | None = 30.0
    battery_hysteresis_percent: float = 10.0
    windows: tuple[str, ...] = ()


def at(temp=None, battery=None, charging=None, minute=12 * 60):
    return Readings(temperature_c=temp, battery_percent=battery, charging=charging, minute_of_day=minute)


def walk(cfg, readings):
    state, out = GateState(), []
    for r in readings:
        state = evaluate(cfg, state, r)
        out.append(state.open)
    return out


def test_temperature_closes_at_the_limit_and_reopens_only_below_the_hysteresis():
    temps = [70, 74.9, 75, 73, 70.1, 70, 74, 75.5]
    assert walk(G(), [at(temp=t) for t in temps]) == [True, True, False, False, False, True, True, False]


def test_a_missing_temperature_reading_keeps_the_gate_as_it_was():
    assert walk(G(), [at(temp=80), at(temp=None), at(temp=60), at(temp=None)]) == [False, False, True, True]


def test_battery_gate_only_on_battery_with_hysteresis():
    seq = [at(battery=50), at(battery=29), at(battery=35), at(battery=39.9), at(battery=40), at(battery=29)]
    assert walk(G(), seq) == [True, False, False, False, True, False]
    # plugged in: open at any charge; a device without a battery never closes it
    assert walk(G(), [at(battery=5, charging=True), at(battery=None)]) == [True, True]


def test_disabled_gates_never_close():
    cfg = G(max_temperature_c=None, min_battery_percent=None)
    assert walk(cfg, [at(temp=120, battery=1)]) == [True]


@pytest.mark.parametrize("windows, minute, inside", [
    (("22:00-06:00",), 23 * 60, True),
    (("22:00-06:00",), 3 * 60, True),
    (("22:00-06:00",), 6 * 60, False),  # end excluded
    (("22:00-06:00",), 12 * 60, False),
    (("12:00-13:00", "22:00-24:00"), 12 * 60 + 30, True),
    (("12:00-13:00", "22:00-24:00"), 23 * 60 + 59, True),
    (("12:00-13:00", "22:00-24:00"), 21 * 60, False),
])
def test_time_windows(windows, minute, inside):
    state = evaluate(G(windows=windows), GateState(), at(minute=minute))
    assert state.open == inside
    assert state.reasons == (() if inside else ("outside time windows",))


@pytest.mark.parametrize("text", ["22-06", "25:00-06:00", "10:60-11:00", "10:00-10:00", "24:30-01:00", ""])
def test_bad_windows_are_refused(text):
    with pytest.raises(WindowError):
        parse_window(text)


def test_window_helpers():
    assert parse_window(" 08:30-17:00 ") == (510, 1020)
    assert in_window(0, (1320, 360)) and not in_window(360, (1320, 360))


def test_reasons_name_every_closed_gate():
    state = evaluate(G(windows=("00:00-01:00",)), GateState(), at(temp=90, battery=10, minute=600))
    assert state.reasons == ("temperature 90.0 C", "battery 10 %", "outside time windows")
