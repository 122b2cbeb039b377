import json

from fednca_app.fleet import render, row
from fednca.telemetry import MAX_TEXT
from fednca_daemon.telemetry import Snapshot, status_json


def status(**fields) -> bytes:
    """Telemetry as the daemon writes it (a site of 100 planned steps; ``steps`` sets progress)."""
    return status_json(Snapshot(**{"site": "a", "version": "1", "time": 1000, "state": "training",
                                   "planned": 100, **fields}))


def hand_written(**fields) -> bytes:
    """A peer's hostile payload: not what any daemon writes."""
    return json.dumps({"v": 1, "site": "a", "time": 1000, "state": "training", **fields}).encode()


def test_row_reads_telemetry_fields():
    r = row("a", status(round=3, steps=40, cpu_percent=48.7, temperature_c=61.2, outbox=1), now=1030)
    assert (r.state, r.round, r.progress, r.age_s, r.cpu_percent, r.outbox) == ("training", 3, 0.4, 30.0, 48.7, 1)


def test_offline_will_and_garbage_do_not_break_the_view():
    assert row("a", b"offline", now=0).state == "offline"
    assert row("a", b"\xff\x00{", now=0).state == "unreadable"
    assert row("a", b"[1, 2]", now=0).state == "unreadable"
    assert row("a", b"{\"time\": " + b"9" * 5000 + b"}", now=0).state == "unreadable"
    assert row("a", b"[" * 100_000, now=0).state == "unreadable"
    hostile = row("a", hand_written(round="7", cpu_percent="hot", outbox=True), now=0)
    assert hostile.round is None and hostile.cpu_percent is None and hostile.outbox is None


def test_render_is_one_aligned_line_per_site_sorted():
    text = render([row("b", b"offline", now=0), row("a", status(round=2, steps=100), now=4000)], header="round 2")
    lines = text.splitlines()
    assert lines[0] == "round 2"
    assert lines[1].startswith("site") and lines[3].startswith("a ") and lines[4].startswith("b ")
    assert "100%" in lines[3] and "50 min ago" in lines[3]
    assert "no site has reported" in render([])


def test_a_hostile_error_text_reaches_the_terminal_escaped_and_bounded():
    evil = "\x1b]0;owned\x07\x1b[2J\x1b[31mdisk full\r\n" + "x" * 500
    r = row("a", status(error=evil[:MAX_TEXT]), now=1000)
    assert r.error is not None and "\x1b" in r.error  # the parser keeps the site's text as it came
    text = render([r])
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "\\x1b[2J" in text and "\\x07" in text
    assert max(len(line) for line in text.splitlines()) < 200


def test_the_round_log_marks_revoked_sites_errors_and_dice():
    from fednca_app.fleet import annotate

    training = row("a", status(round=3, steps=25), now=1000)
    revoked = annotate(training, revoked=True, rejected=None, dice=0.61)
    text = render([revoked])
    assert "revoked" in text and "training" not in text and "25%" not in text and "0.610" in text
    rejected = annotate(training, revoked=False, rejected="update rejected: stale_round", dice=None)
    assert "stale_round" in render([rejected]) and rejected.to_dict()["error"] == "update rejected: stale_round"
    own = annotate(row("a", status(error="sensor lost"), now=1000), revoked=False, rejected="x", dice=None)
    assert own.error == "sensor lost"  # the site's own word comes first


def test_a_paused_sites_closed_gates_fill_its_error_column():
    r = row("a", status(state="paused", gates=("temperature 81 C > 75 C",)), now=1000)
    assert r.error == "paused: temperature 81 C > 75 C" and "paused: temperature" in render([r])
    assert row("a", status(gates=()), now=1000).error is None
