"""Buffered asynchronous rounds with real daemons and the real coordinator on the in-memory broker:
the federation makes new models from the sites that report, and a slow site's update, trained from
a model that has since been replaced, is still counted (weighted by its staleness)."""

from __future__ import annotations

import threading
import time

import pytest

from daemon_support import TINY_MODEL, TINY_TRAIN, Federation, tiny_weights, wait_for
from fednca.transport.base import PublishHandle
from fednca.transport.memory import MemoryBroker
from fednca_broker.config import FederationConfig
from fednca_broker.coordinator import Coordinator
from fednca_broker.round_state import RoundConfig
from fednca_broker.store import RoundStore
from test_daemon_service import Running


class HeldUpdates:
    """A site's slow uplink: its update messages wait here until :meth:`release`, everything else
    goes through at once (a hand-written stand-in for a link that is down during the upload)."""

    def __init__(self, client) -> None:
        self.client = client
        self.held: list[tuple[str, bytes, PublishHandle]] = []
        self.released = threading.Event()
        self._publish = client.publish
        client.publish = self.publish  # the daemon holds this client: intercept its publications

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> PublishHandle:
        if "/updates/" not in topic or self.released.is_set():
            return self._publish(topic, payload, qos=qos, retain=retain)
        handle = PublishHandle(topic)  # unanswered until the link comes back
        self.held.append((topic, payload, handle))
        return handle

    def release(self) -> None:
        self.released.set()
        for topic, payload, handle in self.held:
            sent = self._publish(topic, payload, qos=1)
            sent.wait(5.0)
            handle.settle(sent.reason_code if sent.reason_code is not None else 0)


@pytest.mark.slow
def test_new_models_come_without_the_slow_site_and_its_late_update_still_counts(tmp_path):
    sites = ("site-a", "site-b", "site-c")
    fed = Federation(tmp_path, sites=sites)
    broker = MemoryBroker()
    rounds = RoundConfig(mode="async", buffer_size=2, max_staleness=3, round_s=3600.0)
    cfg = FederationConfig(name="fed", rounds=rounds, max_rounds=4, model=TINY_MODEL, train=TINY_TRAIN)
    store = RoundStore(root=tmp_path / "store", federation="fed")
    coordinator = Coordinator(config=cfg, store=store, keys=fed.coordinator, registry=fed.registry,
                              client=broker.client(client_id="coordinator"), clock=time.time,
                              initial_model=tiny_weights())
    coordinator.start()
    stop = threading.Event()
    loop = threading.Thread(target=lambda: coordinator.run_until(lambda c: c.finished or stop.is_set(), poll=0.05),
                            daemon=True)
    loop.start()
    slow = HeldUpdates(broker.client(client_id="daemon-site-c"))
    running = [Running(fed, broker, site, wall=time.time, data={"phantom": {"site": i, "count": 8, "seed": 0}},
                       training={"min_steps": 5}, client=slow.client if site == "site-c" else None)
               for i, site in enumerate(sites)]
    try:
        wait_for(lambda: slow.held, timeout=120, what="the slow site's first update")
        # The two others fill buffers on their own: the federation moves on without the slow site.
        wait_for(lambda: coordinator.round >= 3, timeout=180, what="two models made without the slow site")
        slow.release()
        wait_for(lambda: coordinator.finished, timeout=180, what="the federation's end")
    finally:
        stop.set()
        for d in running:
            d.stop()
        loop.join(10)
    log = store.read_log()
    closed = [r for r in log if r.get("kind") == "round_closed"]
    assert closed and all(r["reason"] in ("buffer_full", "all_reported") for r in closed)
    assert sorted(closed[0]["sites"]) == ["site-a", "site-b"] and closed[1]["sites"] != ["site-c"]
    late = [r for r in log if r.get("kind") == "update_accepted" and r["site"] == "site-c"]
    assert late and late[0]["update_id"] and late[0].get("staleness", 0) >= 1, late
    assert not [r for r in log if r.get("kind") == "update_rejected" and r["reason"] != "duplicate_site"]
    aggregated = [r for r in log if r.get("kind") == "round_aggregated"]
    assert [r["round"] for r in aggregated] == [1, 2, 3, 4]
    assert any("site-c" in r["sites"] for r in aggregated)
