"""Times as people read them, and a peer's strings that cannot drive the terminal."""

from fednca.display import duration, eta, local_time, number, relative, safe


def test_safe_escapes_every_control_and_format_character_visibly_and_bounds_the_length():
    assert safe("ok text é") == "ok text é"
    assert safe("\x1b[2Jx\x07\r\n\t\x00") == "\\x1b[2Jx\\x07\\x0d\\x0a\\x09\\x00"
    assert safe("a\u202eb\u200bc\x9b") == "a\\u202eb\\u200bc\\x9b"  # bidi override, zero width, C1 CSI
    assert safe("x" * 500, 10) == "x" * 9 + "…"


def test_numbers_are_bounded_and_absent_ones_are_a_dash():
    assert number(None) == "-" and number(float("nan")) == "?" and number("hot") == "?"
    assert number(0.61234) == "0.612" and number(1e300, ".0f", bound=1e4) == ">1e+04"


def test_times_are_relative_near_now_and_dates_further_away():
    assert relative(1300.0, 1000.0) == "in 5 min" and relative(820.0, 1000.0) == "3 min ago"
    assert relative(1030.0, 1000.0) == "in 30 s" and relative(None, 0) == "-"
    assert relative(1000.0 + 5 * 86400, 1000.0) == local_time(1000.0 + 5 * 86400)
    assert duration(3 * 3600) == "3.0 h" and duration(4 * 86400) == "4 days"


def test_eta_is_the_pace_so_far_applied_to_the_work_left():
    assert eta(3, 8, 180.0) == "ETA 5 min" and eta(0, 8, 10.0) == "ETA ?" and eta(8, 8, 10.0) == "done"


def test_pace_measures_from_the_first_chunk_of_a_round_and_starts_again_for_the_next():
    from fednca.display import Pace

    pace = Pace()
    assert pace.line(round=3, steps=10, planned=110, now=100.0) == "round 3: step 10 of 110 (9 %), ETA ?"
    assert pace.line(round=3, steps=30, planned=110, now=160.0) == "round 3: step 30 of 110 (27 %), ETA 4 min"
    assert pace.line(round=4, steps=5, planned=100, now=170.0).endswith("ETA ?")
