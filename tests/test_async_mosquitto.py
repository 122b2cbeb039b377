"""Buffered asynchronous rounds with real processes on mosquitto: a site whose link goes down while
it uploads does not hold the federation up, and when the link comes back its update, trained from a
model that has since been replaced, is counted once, weighted by its staleness."""

from __future__ import annotations

import pytest

from e2e_support import Federation, wait_until
from fednca_app.harness.links import Direction, Outages, Profile
from mosquitto_fixture import MOSQUITTO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]

TIMEOUT = 180.0  # rounds of tiny trainers on two busy cores take seconds: a bound only
ASYNC = {"mode": "async", "buffer_size": 2, "max_staleness": 50}
# site2's uplink: an update of ~16 KB takes ~8 s to cross, so the outage surely cuts it mid-way;
# connections tried while the link is down are held, and completed when it comes back.
SLOW_UP = Profile(name="slow-up", up=Direction(kbit_s=16), outages=Outages(refuse=False))


def _outbox(fed: Federation, site: str) -> list[str]:
    folder = fed.state_dir(site) / "outbox"
    return sorted(p.name for p in folder.glob("r*.update")) if folder.is_dir() else []


def test_a_site_cut_off_mid_upload_neither_stalls_the_federation_nor_loses_its_update(tmp_path):
    fed = Federation(root=tmp_path, sites=3, rounds=200, quorum=2, grace=0.0, links={"site2": SLOW_UP},
                     round_settings=ASYNC)
    link = fed.links["site2"]
    try:
        fed.start_broker()
        fed.start()
        # The moment site2 has stored its first update, before it has all crossed: its link goes down.
        first = wait_until(lambda: _outbox(fed, "site2"), timeout=TIMEOUT, what="site2's first update", federation=fed)
        link.outage()
        uid = first[0].split("-", 1)[1].removesuffix(".update")
        trained_from = int(first[0][1:].split("-", 1)[0])
        # The two other sites fill buffers on their own: new models without site2.
        wait_until(lambda: fed.aggregated(trained_from + 2), timeout=TIMEOUT, what="two models made without site2",
                   federation=fed)
        restored_at = max(r["round"] for r in fed.records("round_aggregated"))
        link.restore()
        counted = wait_until(lambda: [r for r in fed.records("update_accepted") if r["update_id"] == uid],
                             timeout=TIMEOUT, what="site2's update, sent again after the outage", federation=fed)
        wait_until(lambda: uid not in "".join(_outbox(fed, "site2")), timeout=TIMEOUT,
                   what="site2's receipt", federation=fed)
    finally:
        fed.close()
    records = fed.records()
    closed = [r for r in records if r.get("kind") == "round_closed"]
    assert all(r["reason"] in ("buffer_full", "all_reported") for r in closed), [(r["round"], r["reason"], r["sites"]) for r in closed]
    during = [r for r in closed if trained_from <= r["round"] <= restored_at]
    assert len(during) >= 2 and all("site2" not in r["sites"] for r in during)
    assert len(counted) == 1 and counted[0]["site"] == "site2"  # once, though the site sent it again
    assert counted[0]["staleness"] == counted[0]["round"] - trained_from >= 2
    assert not [r for r in records if r.get("kind") == "update_rejected" and r["site"] == "site2"
                and r["reason"] not in ("duplicate_site",)]
