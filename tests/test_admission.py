"""Per-site admission and bounded verdict lines: the pure parts driven directly, then a flood
through the coordinator on the in-memory broker with a fake clock (nothing here sleeps)."""

from __future__ import annotations

import pytest

from fednca.topics import Topics
from fednca_broker.admission import STATUS, UPDATES, Admission, Bucket, Budget, budgets_for, take
from fednca_broker.line_limit import LINES, LineKey, LineLimiter
from fednca_broker.roundlog import LinesSuppressedRecord, SiteThrottledRecord, decode, encode
from test_coordinator import FED, SITES, T0, Federation, world  # noqa: F401  (world: a module fixture)

T = Topics(FED)
BUDGET = Budget(burst_messages=3, messages_per_s=1.0, burst_bytes=100, bytes_per_s=10.0)


# -- the bucket ---------------------------------------------------------------------------------


def test_a_full_bucket_admits_its_burst_then_refuses():
    bucket = Bucket.full(BUDGET, 0.0)
    verdicts = []
    for _ in range(5):
        bucket, ok = take(bucket, BUDGET, 10, 0.0)
        verdicts.append(ok)
    assert verdicts == [True, True, True, False, False]


def test_the_bucket_refills_with_time_up_to_its_burst():
    bucket = Bucket(0.0, 100.0, 0.0)
    assert take(bucket, BUDGET, 1, 0.5)[1] is False  # half a token
    bucket, ok = take(bucket, BUDGET, 1, 1.0)
    assert ok and bucket.messages == pytest.approx(0.0)
    bucket, _ = take(Bucket(0.0, 0.0, 0.0), BUDGET, 0, 1000.0)
    assert bucket.messages == pytest.approx(BUDGET.burst_messages - 1) and bucket.bytes == BUDGET.burst_bytes


def test_bytes_are_a_budget_of_their_own():
    bucket = Bucket.full(BUDGET, 0.0)
    bucket, ok = take(bucket, BUDGET, 90, 0.0)
    assert ok
    bucket, ok = take(bucket, BUDGET, 20, 0.0)  # a message token is left, 10 bytes are not enough
    assert not ok and bucket.messages == pytest.approx(2.0) and bucket.bytes == pytest.approx(10.0)
    assert take(bucket, BUDGET, 20, 1.0)[1]  # a second later: 20 bytes


def test_a_clock_that_goes_back_refills_nothing():
    bucket = Bucket(0.0, 0.0, 100.0)
    bucket, ok = take(bucket, BUDGET, 0, 50.0)
    assert not ok and bucket.at == 100.0 and bucket.messages == 0.0


def test_one_site_spending_its_budget_leaves_the_others_whole():
    admission = Admission(budgets={UPDATES: BUDGET, STATUS: BUDGET})
    flood = [admission.admit("bad", UPDATES, 10, 0.0) for _ in range(50)]
    assert flood.count(True) == 3
    assert admission.refused("bad").messages == 47 and admission.refused("bad").bytes == 470
    assert all(admission.admit("good", UPDATES, 10, 0.0) for _ in range(3))
    assert admission.refused("good").messages == 0
    # Its own telemetry has a bucket of its own: a status flood does not cost a site its update.
    assert admission.admit("bad", STATUS, 10, 0.0)
    admission.forget("bad")
    assert admission.admit("bad", UPDATES, 10, 0.0)  # a site enrolled again starts full


def test_the_budgets_of_a_federation_cover_an_honest_site_and_not_a_flood():
    admission = Admission(budgets=budgets_for(max_update_bytes=40_000, status_max_bytes=4096))
    now = 0.0
    # An hour of a site that reports five times a second and sends an update and 3 resends every 30 s.
    for tenth in range(36_000):
        now = tenth / 10
        if tenth % 2 == 0:
            assert admission.admit("honest", STATUS, 4096, now), now
        if tenth % 300 == 0:
            assert all(admission.admit("honest", UPDATES, 40_000, now) for _ in range(4)), now
    assert admission.refused("honest").messages == 0
    updates = [admission.admit("flood", UPDATES, 1000, now) for _ in range(3000)]
    assert updates.count(True) <= 16
    status = [admission.admit("flood", STATUS, 100, now) for _ in range(3000)]
    assert status.count(True) <= 600


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError, match="bytes_per_s"):
        Budget(burst_messages=1, messages_per_s=1, burst_bytes=1, bytes_per_s=0)


# -- the lines ----------------------------------------------------------------------------------


def test_a_few_lines_per_key_and_window_then_a_count():
    limiter = LineLimiter(window_s=60.0, lines=2)
    key, other = LineKey("update_rejected", "a", "bad_signature"), LineKey("update_rejected", "b", "bad_signature")
    assert limiter.offer(key, 0.0) and limiter.offer(key, 0.5)
    assert [limiter.offer(key, t) for t in (1.0, 2.0, 59.0)] == [False, False, False]
    assert limiter.offer(other, 5.0)  # another site is not counted against this one
    assert limiter.due(59.9) == []
    (summary,) = limiter.due(60.0)
    assert (summary.line_kind, summary.site, summary.reason, summary.count, summary.since) == (
        "update_rejected", "a", "bad_signature", 3, 1.0)  # fmt: skip
    assert limiter.offer(key, 61.0)  # a new window: written again
    assert limiter.pending == 0


def test_lines_offered_after_the_window_and_before_due_are_counted_not_lost():
    limiter = LineLimiter(window_s=10.0, lines=1)
    key = LineKey("site_throttled", "a", "")
    assert limiter.offer(key, 0.0)
    assert not limiter.offer(key, 5.0)
    assert not limiter.offer(key, 12.0)  # the window passed, but its count is not written yet
    (summary,) = limiter.due(12.0)
    assert summary.count == 2


def test_the_new_kinds_round_trip_and_old_style_lines_decode():
    throttled = SiteThrottledRecord(at=1.0, site="a", topic="updates", bytes=10, refused=7)
    suppressed = LinesSuppressedRecord(at=2.0, line_kind="update_rejected", site="a", reason="bad_signature",
                                       count=3, since=1.5)  # fmt: skip
    for record in (throttled, suppressed):
        assert decode(encode(record)) == record
    assert decode({"kind": "site_throttled", "at": 1.0, "site": "a", "topic": "status", "bytes": 3}).refused == 1
    assert decode({"kind": "lines_suppressed", "at": 1.0, "line_kind": "site_throttled", "site": "a", "count": 2,
                   "since": 0.5}).reason == ""  # fmt: skip


# -- a flood through the coordinator ------------------------------------------------------------


def test_a_flooding_site_is_acknowledged_and_counted_while_the_others_are_accepted(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    fed.drain()
    flooder = fed.broker.client(client_id="flooder")
    flooder.connect()
    garbage = b"\x00" * 2000
    for _ in range(10):  # the coordinator drains while the flood comes, as it does on mosquitto
        for _ in range(200):
            flooder.publish(T.updates("a"), garbage)
        while fed.coordinator.step() > 0:
            pass
    fed.send("b")  # right after the flood: an honest site's update
    while fed.coordinator.step() > 0:
        pass
    assert fed.broker.queued("coordinator") == 0 and fed.broker.dropped("coordinator") == 0
    assert [a.site for a in fed.coordinator.state.accepted] == ["b"]
    lines = fed.store.read_log()
    kinds = [r.kind for r in lines]
    assert kinds.count("update_rejected") == LINES and kinds.count("site_throttled") == LINES
    assert len(lines) < 20, kinds
    messages = fed.drain()
    receipts = fed.receipts(messages)
    # Beyond its budget a message gets no receipt: one signature per admitted message at most.
    assert sum(1 for r in receipts if r.site == "a") <= 16
    assert [r.site for r in receipts if r.accepted] == ["b"]
    events = fed.events(messages)
    assert sum(1 for e in events if e["kind"] in ("update_rejected", "site_throttled")) == 2 * LINES
    # A minute later the counts of what was left out are written, once per kind.
    fed.clock.now = T0 + 61.0
    fed.coordinator.step()
    summaries = [r for r in fed.store.read_log() if isinstance(r, LinesSuppressedRecord)]
    assert {(s.line_kind, s.site) for s in summaries} == {("update_rejected", "a"), ("site_throttled", "a")}
    rejected = next(s for s in summaries if s.line_kind == "update_rejected")
    throttled = next(s for s in summaries if s.line_kind == "site_throttled")
    assert rejected.count + throttled.count + 2 * LINES == 2000


def test_a_site_within_its_budget_is_unaffected_by_another_one_spent(world, tmp_path):
    fed = Federation(world, tmp_path).start()
    flooder = fed.broker.client(client_id="flooder")
    flooder.connect()
    for _ in range(1000):
        flooder.publish(T.status("a"), b"{}")
    for site in SITES[1:]:
        fed.send(site)
    while fed.coordinator.step() > 0:
        pass
    assert [a.site for a in fed.coordinator.state.accepted] == list(SITES[1:])
    assert set(fed.coordinator.statuses) == {"a"}
