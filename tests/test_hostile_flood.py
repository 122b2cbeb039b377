"""A hostile enrolled site floods the coordinator on a real mosquitto; the honest sites still count.

Real processes (mosquitto with the generated configuration, ``fednca coordinator run``, one
``fednca daemon`` per honest site) as in tests/test_e2e_mosquitto.py. The hostile site's account
publishes a few thousand junk updates and status messages as fast as paho sends them, only to
127.0.0.1, while the honest sites train, then tries to take over the coordinator's session.
mosquitto runs with client ids bound to users (``mosquitto.bind_client_ids``, the default). Every honest
site's update must be accepted, the coordinator must stay up and keep its one connection,
mosquitto must drop nothing queued for the coordinator, and the round log must grow by a bounded
number of lines (docs/threat-model.md, "Floods and sessions").
"""

from __future__ import annotations

import math
import os
import threading
import time

import pytest

from e2e_support import Federation, wait_until
from fednca_broker.admission import UPDATE_SENDS_PER_MINUTE
from fednca_broker.line_limit import LINES
from mosquitto_fixture import MOSQUITTO

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]

FLOOD = 3000  # messages: far beyond the coordinator's queue of 1000 if it did not drain them
ROUND_TIMEOUT = 120.0  # one round of two tiny trainers takes ~10 s on two busy cores: a bound only
HOSTILE = "site2"


def flood(client, prefix: str, count: int) -> list:
    """``count`` junk messages on the hostile site's own topics, sent without waiting for each."""
    handles = []
    for i in range(count):
        if i % 10 == 9:
            handles.append(client.publish(f"{prefix}status/{HOSTILE}", b'{"state":"flood"}'))
        else:
            handles.append(client.publish(f"{prefix}updates/{HOSTILE}", os.urandom(1500)))
    return handles


@pytest.fixture
def fed(tmp_path):
    federation = Federation(root=tmp_path / "federation", sites=3, rounds=2, quorum=2, grace=1.0)
    yield federation
    federation.close()


def receipts_until_next_round(client, prefix: str) -> int:
    """The receipts ``client`` gets before the next round is announced (the first announcement not
    flagged retained): the coordinator announces it only after it has handled every message that
    came before, so the count is complete."""
    count = 0
    while True:
        message = client.receive(ROUND_TIMEOUT)
        assert message is not None, "no announcement of the next round"
        client.ack(message)
        if message.topic == prefix + "round" and not message.retain:
            return count
        count += message.topic == prefix + f"receipts/{HOSTILE}"


def test_a_flooding_site_costs_the_honest_sites_nothing(fed):
    assert fed.processes.cfg.mosquitto.bind_client_ids  # the default: the files init wrote, unchanged
    fed.start_broker()
    fed.start_coordinator()
    wait_until(lambda: fed.records("round_opened"), timeout=ROUND_TIMEOUT, what="round 1 opened", federation=fed)
    before = len(fed.records())
    prefix = f"fednca/{fed.cfg.federation.name}/"
    attacker = fed.client(HOSTILE, f"e2e-flood-{HOSTILE}")
    attacker.subscribe(prefix + f"receipts/{HOSTILE}", 1)
    attacker.subscribe(prefix + "round", 1)
    sent: list = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: sent.extend(flood(attacker, prefix, FLOOD)), name="flood")
    thread.start()
    honest = [s for s in fed.sites if s != HOSTILE]
    for site in honest:
        fed.start_site(site)
    thread.join(ROUND_TIMEOUT)
    assert not thread.is_alive(), "the flood was not sent"
    for handle in sent:  # the broker took every junk message (PUBACK): none was refused at the door
        assert handle.wait(ROUND_TIMEOUT)

    # Round 1 counts both honest sites; the junk cost at most one budget of signed receipts.
    receipts = receipts_until_next_round(attacker, prefix)
    minutes = (time.monotonic() - started) / 60  # the budget refills while a loaded machine catches up
    assert fed.aggregated(1)
    assert {r["site"] for r in fed.records("update_accepted") if r["round"] == 1} == set(honest)
    assert receipts <= 2 * UPDATE_SENDS_PER_MINUTE * (1 + minutes) + 2, (receipts, minutes)
    # The round log grew by the round's own lines plus a bounded number for the flood.
    flood_kinds = ("update_rejected", "site_throttled", "lines_suppressed")
    flood_lines = [r for r in fed.records()[before:] if r["kind"] in flood_kinds]
    assert all(r["site"] == HOSTILE for r in flood_lines)
    windows = 1 + math.floor(minutes)  # each minute's window may write its own few lines
    assert len(flood_lines) <= 3 * (LINES + 1) * windows, [(r["kind"], r.get("reason")) for r in flood_lines]
    assert len(fed.records()) - before < 20 + len(flood_lines)

    # Then it tries to take over the coordinator's session: mosquitto gives it its own id instead.
    attacker.disconnect()
    intruder = fed.client(HOSTILE, fed.cfg.client_id)
    wait_until(lambda: fed.aggregated(2), timeout=ROUND_TIMEOUT, what="round 2 aggregated", federation=fed)
    assert {r["site"] for r in fed.records("update_accepted") if r["round"] == 2} == set(honest)
    fed.check_alive()
    assert intruder.connected
    for party in ("coordinator", *honest):  # nobody lost a connection to the intruder
        assert "lost the broker" not in fed.log(party), fed.tails(party)
    for site in honest:
        fed.stop(site)
