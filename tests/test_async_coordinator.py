"""The coordinator service in the async mode, on the in-memory broker with a fake clock: a stale
update is counted, aggregated with its delta scaled by its staleness, and a coordinator restarted
in the middle of the buffer opens it again from the store against the model it trained from."""

from __future__ import annotations

import math

import numpy as np

from fednca import aggregate
from fednca.aggregate import AggregationConfig
from fednca_broker.config import FederationConfig
from fednca_broker.round_state import RoundConfig
from test_coordinator import FED, SAMPLES, Federation, world  # noqa: F401 (world is the module's fixture)

ASYNC = RoundConfig(mode="async", buffer_size=2, max_staleness=2)


def _travelled(delta):
    return {n: a.astype(np.float16).astype(np.float32) for n, a in delta.items()}


def test_a_stale_update_is_aggregated_scaled_down_even_across_a_restart(world, tmp_path):  # noqa: F811
    cfg = FederationConfig(name=FED, model=world["cfg"], max_rounds=None, rounds=ASYNC)
    fed = Federation(world, tmp_path, config=cfg).start()
    fed.send("a")
    fed.send("b")
    fed.coordinator.step()
    assert fed.coordinator.round == 2  # a buffer of two: no quorum, no grace
    model2, sha2 = fed.coordinator.model, fed.coordinator.model_sha256
    assert fed.announcement().header.max_staleness == 2
    fed.send("c")  # trained from round 1's model, one version ago
    fed.coordinator.step()
    assert fed.coordinator.state.accepted_from("c").staleness == 1
    fed.coordinator.close()

    again = Federation(world, tmp_path, broker=fed.broker, config=cfg, clock=fed.clock).start()
    assert again.coordinator.state.accepted_from("c").staleness == 1
    fresh = {n: a * 0.5 for n, a in world["deltas"]["a"].items()}
    again.send("a", world["update"]("a", round=2, base_sha256=sha2, delta=fresh))
    again.coordinator.step()
    assert again.coordinator.round == 3
    weight = 1 / math.sqrt(2)
    stale = {n: (a.astype(np.float64) * weight).astype(np.float32) for n, a in _travelled(world["deltas"]["c"]).items()}
    expected = aggregate.apply(model2, aggregate.aggregate([(stale, SAMPLES["c"]), (_travelled(fresh), 1)],
                                                           AggregationConfig()))
    for name, value in again.coordinator.model.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-8)
    closed = [r for r in again.store.read_log() if r.kind == "round_closed"]
    assert [(r.round, str(r.reason), r.sites) for r in closed] == [(1, "buffer_full", ("a", "b")),
                                                                   (2, "buffer_full", ("c", "a"))]
