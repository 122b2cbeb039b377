"""The daemon against the real coordinator service (broker/coordinator.py) on the in-memory broker."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from daemon_support import TINY_MODEL, TINY_TRAIN, Federation, tiny_weights, wait_for
from fednca.transport.memory import MemoryBroker
from fednca_broker.config import FederationConfig
from fednca_broker.coordinator import Coordinator
from fednca_broker.rounds import RoundConfig
from fednca_broker.store import RoundStore
from test_daemon_service import Running


@pytest.mark.slow
def test_two_sites_complete_a_federation_with_the_real_coordinator(tmp_path):
    fed = Federation(tmp_path, sites=("site-a", "site-b"))
    broker = MemoryBroker()
    cfg = FederationConfig(name="fed", rounds=RoundConfig(quorum_count=2, grace_s=0.0, round_s=3600.0),
                           max_rounds=1, model=TINY_MODEL, train=TINY_TRAIN)
    store = RoundStore(root=tmp_path / "store", federation="fed")
    coordinator = Coordinator(config=cfg, store=store, keys=fed.coordinator, registry=fed.registry,
                              client=broker.client(client_id="coordinator"), clock=time.time,
                              initial_model=tiny_weights())
    coordinator.start()
    stop = threading.Event()
    loop = threading.Thread(target=lambda: coordinator.run_until(lambda c: c.finished or stop.is_set(), poll=0.05),
                            daemon=True)
    loop.start()
    sites = [Running(fed, broker, site, wall=time.time, data={"phantom": {"site": i, "count": 8, "seed": 0}},
                     training={"min_steps": 5})
             for i, site in enumerate(fed.sites)]
    try:
        wait_for(lambda: coordinator.finished, timeout=120, what="the round")
        for d in sites:
            # The final model is announced as round 2 with its deadline already past: nothing to train.
            wait_for(lambda: d.state.done_round == 2 and d.service.worker_pid is None, what="the final announcement")
            # The state says so as the daemon decides; the file follows once its fsync returns.
            wait_for(lambda: d.service.folder.load_done().round == 2, what="done.json written")
            assert d.state.last_receipt == "past_deadline" and d.service.folder.outbox.entries() == []
            assert d.service.folder.load_done().round == 2
            assert len(d.service.trainer_pids) == 1  # one trainer for the round, none for the final model
    finally:
        stop.set()
        for d in sites:
            d.stop()
        loop.join(10)
    log = store.read_log()
    aggregated = [r for r in log if r.get("kind") == "round_aggregated"]
    assert [r["round"] for r in aggregated] == [1]
    assert all(sorted(r["sites"]) == ["site-a", "site-b"] and r["reason"] == "all_reported" for r in aggregated)
    accepted = [r for r in log if r.get("kind") == "update_accepted"]
    assert sorted((r["round"], r["site"]) for r in accepted) == [(1, "site-a"), (1, "site-b")]
    assert not any(r.get("kind") == "update_rejected" for r in log)
    final = coordinator.model
    assert any(not np.array_equal(final[k], v) for k, v in tiny_weights().items())
