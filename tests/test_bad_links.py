"""Bad links with real processes: mosquitto, ``fednca coordinator run`` and ``fednca daemon``s, with
parties behind the harness's link emulator (app/harness/link_proxy.py).

* A site on a 2G link (64 kbit/s, 800 ms round trip) loses its link for 30 s in the middle of its
  upload: the link goes down when 4 KB of the site's update PUBLISH has reached mosquitto (the
  link watches the bytes, so the outage overlaps the upload whenever the site gets there). The
  site resends after the outage, from its client's memory, without training again; the
  coordinator counts the update once; the site's telemetry reports the reconnect and a round trip
  of at least the link's 800 ms.
* The coordinator is cut off from mosquitto during a round, after the first update: the sites
  go on publishing to the broker, which keeps their updates in the coordinator's persistent
  session; when the link is back, the round closes with every update, each counted once.
* A reconnect storm: every site's connection drops at once, twice; all come back together and
  both rounds close with every site.
* A site on the 2G link whose first connection is cut in the middle of the model download: the
  broker sends the announcement once more (the copy in flight), not a second time as the retained
  copy, and the site stores and trains it once.

docs/faults.md says what each shows. Each run ends with the end-to-end tests' checks
(``check_rounds``: every round aggregated, FedAvg recomputed from the stored payloads, no site
counted twice, every outbox empty).
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from e2e_support import COORDINATOR_LINK, FEDERATION, Federation, wait_until
from fednca_app.harness.links import BUILT_IN, Cuts, Direction, Outages, Profile
from mosquitto_fixture import MOSQUITTO
from test_e2e_mosquitto import announcements, check_rounds

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]

ROUND_TIMEOUT = 120.0  # a bound, not a measurement: a round of tiny trainers takes ~10 s on two busy cores
OUTAGE_S = 30.0
# The 2g link (64 kbit/s, 800 ms round trip) without its jitter, so that no round trip is shorter
# than 800 ms, and without its periodic outages: the test makes its own.
_2G = BUILT_IN["2g"]
SLOW = dataclasses.replace(_2G, outages=Outages(), up=dataclasses.replace(_2G.up, jitter_ms=0.0),
                           down=dataclasses.replace(_2G.down, jitter_ms=0.0))
NEAR = Profile(name="near", up=Direction(latency_ms=20), down=Direction(latency_ms=20))
UPDATES = f"fednca/{FEDERATION}/updates/"


@pytest.fixture
def running(tmp_path):
    made: list[Federation] = []

    def make(**settings) -> Federation:
        made.append(Federation(root=tmp_path / f"federation{len(made)}", **settings))
        return made[-1]

    yield make
    for fed in made:
        fed.close()


def _finish(fed: Federation) -> None:
    """Wait for the coordinator to finish and every site's last receipt to arrive (over its link)."""
    wait_until(lambda: fed.returncode("coordinator") == 0, timeout=3 * ROUND_TIMEOUT,
               what="the coordinator to finish the federation", federation=fed)
    for site in fed.sites:
        outbox = fed.state_dir(site) / "outbox"
        wait_until(lambda: not list(outbox.glob("*.update")), timeout=60, what=f"{site}'s last receipt",
                   federation=fed)


def _count(fed: Federation, site: str, pattern: str) -> int:
    return len(re.findall(pattern, fed.log(site), re.MULTILINE))


def test_an_upload_cut_by_a_30_s_outage_on_a_2g_link_is_accepted_once_without_training_again(running):
    fed = running(sites=2, rounds=1, quorum=2, grace=2.0, links={"site1": SLOW})
    link = fed.links["site1"]
    trigger = link.on_publish(UPDATES + "site1", after_bytes=4096, action=lambda: link.outage(OUTAGE_S))
    fed.start_broker()
    watch = fed.observe(["round"])
    fed.start()
    wait_until(trigger.fired.is_set, timeout=ROUND_TIMEOUT, what="site1's update to start crossing its link",
               federation=fed)
    partial = link.stats.up_bytes
    assert link.down() and link.stats.dropped >= 1
    wait_until(lambda: link.stats.refused >= 1, timeout=OUTAGE_S, what="a reconnect refused during the outage",
               federation=fed)
    assert not fed.aggregated(1), "the round closed without the update cut off mid-upload"
    assert not [r for r in fed.records("update_accepted") if r["site"] == "site1"]

    _finish(fed)
    counted = check_rounds(fed, rounds=1, published=announcements(fed, watch.messages))
    assert sorted(counted[1]) == ["site0", "site1"]
    site1 = [r for r in fed.records() if r.get("site") == "site1" and r.get("update_id")]
    assert [r["kind"] for r in site1] == ["update_accepted"], site1  # once, no copy
    assert _count(fed, "site1", r"trainer \d+ started for round 1\b") == 1, fed.tails("site1")
    assert _count(fed, "site1", r"round 1: update \w+ stored") == 1, fed.tails("site1")
    assert link.stats.outages == 1 and link.stats.connections >= 2 and link.stats.up_bytes > partial
    telemetry = wait_until(lambda: _linked(fed.processes.telemetry().get("site1")), timeout=30,
                           what="site1's telemetry after its reconnect", federation=fed)
    assert telemetry["reconnects"] >= 1 and telemetry["rtt_ms"] >= 800, telemetry  # the link's round trip


def _linked(status: dict | None) -> dict | None:
    """A status that reports a reconnect and a round trip, or None."""
    if status and (status.get("reconnects") or 0) >= 1 and status.get("rtt_ms") is not None:
        return status
    return None


def test_a_coordinator_cut_off_from_the_broker_during_a_round_loses_nothing(running):
    fed = running(sites=3, rounds=2, quorum=3, grace=2.0, coordinator_link=NEAR)
    link = fed.links[COORDINATOR_LINK]
    # The partition begins as soon as round 1's announcement has reached mosquitto: the sites train
    # and publish round 1 while the coordinator cannot hear them.
    cut = link.on_publish(f"fednca/{FEDERATION}/round", after_bytes=1 << 30, action=link.outage)
    fed.start_broker()
    watch = fed.observe(["round"])
    fed.start()
    wait_until(cut.fired.is_set, timeout=ROUND_TIMEOUT, what="round 1 announced", federation=fed)
    for site in fed.sites:
        wait_until(lambda: fed.site_logged(site, r"round 1: update \w+ taken by the broker"), timeout=ROUND_TIMEOUT,
                   what=f"{site}'s round-1 update taken by mosquitto during the partition", federation=fed)
    assert link.down() and not fed.aggregated(1)
    assert not fed.records("update_accepted"), "the coordinator heard an update through the partition"
    wait_until(lambda: re.search(r"lost the broker", fed.log("coordinator")), timeout=30,
               what="the coordinator to notice the partition", federation=fed)
    link.restore()

    _finish(fed)
    counted = check_rounds(fed, rounds=2, published=announcements(fed, watch.messages))
    assert all(sorted(counted[r]) == fed.sites for r in (1, 2)), counted
    assert link.stats.outages == 1 and link.stats.connections >= 2  # the coordinator connected again


def test_a_reconnect_storm_of_every_site_at_once_is_absorbed(running):
    sites = 4
    fed = running(sites=sites, rounds=2, quorum=sites, grace=2.0, links={f"site{i}": NEAR for i in range(sites)})
    fed.start_broker()
    watch = fed.observe(["round"])
    fed.start()
    for rnd in (1, 2):
        wait_until(lambda: all(fed.site_logged(s, rf"trainer \d+ started for round {rnd}\b") for s in fed.sites),
                   timeout=ROUND_TIMEOUT, what=f"every site training round {rnd}", federation=fed)
        dropped = fed.links.storm()
        assert dropped >= sites, f"round {rnd}: the storm dropped {dropped} connections"

    _finish(fed)
    counted = check_rounds(fed, rounds=2, published=announcements(fed, watch.messages))
    assert all(sorted(counted[r]) == fed.sites for r in (1, 2)), counted
    for site in fed.sites:
        assert fed.links[site].stats.connections >= 3, (site, fed.links[site].stats)  # connected again after each
    wait_until(lambda: all(((fed.processes.telemetry().get(s) or {}).get("reconnects") or 0) >= 2 for s in fed.sites),
               timeout=30, what="every site's telemetry to report both reconnects", federation=fed)


def test_a_model_download_cut_in_its_middle_crosses_once_more_and_is_taken_once(running):
    cut_at = 12_000  # bytes down the site's first connection: the middle of the ~31 KB announcement
    slow = dataclasses.replace(SLOW, cuts=Cuts(at_byte=cut_at, connections=1, direction="down"))
    fed = running(sites=1, rounds=1, quorum=1, grace=1.0, links={"site0": slow})
    link = fed.links["site0"]
    fed.start_broker()
    watch = fed.observe(["round"])
    fed.start()
    wait_until(lambda: fed.site_logged("site0", r"round 1: update \w+ stored"), timeout=ROUND_TIMEOUT,
               what="site0 to train round 1 and store its update", federation=fed)
    # Before the coordinator can answer with its final model: the announcement began to cross twice,
    # cut, then the copy in flight again after the reconnect; no third time as the retained copy.
    assert link.stats.cut == 1 and link.stats.connections >= 2
    assert link.publishes[("down", f"fednca/{FEDERATION}/round")] == 2, link.publishes
    _finish(fed)
    check_rounds(fed, rounds=1, published=announcements(fed, watch.messages))
    assert _count(fed, "site0", r"round 1 announced") == 1, fed.tails("site0")  # stored once
    assert _count(fed, "site0", r"trainer \d+ started for round 1\b") == 1, fed.tails("site0")
