"""A site following rounds announced as 8-bit deltas (docs/wire.md): it rebuilds each model from the
one it holds, falls back to the whole model on the retained model topic when it lacks the base
(a new site, or one that missed rounds while stopped), and sends q8 updates when told to."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_support import FakeCoordinator, Federation, tiny_weights, wait_for
from test_daemon_service import ALL_IMAGES, T0, Running

from fednca.quantise import apply, quantise_with_feedback
from fednca.tensorcodec import read_document
from fednca.topics import Topics
from fednca.transport.memory import MemoryBroker
from fednca.wire import make_announcement, model_sha256, verify_update
from fednca_daemon.held_model import load_held, load_residual

T = Topics("fed")


@pytest.fixture
def fed(tmp_path):
    return Federation(tmp_path, sites=("site-a",))


@pytest.fixture
def broker():
    return MemoryBroker()


@pytest.fixture
def coordinator(fed, broker):
    client = broker.client(client_id="coordinator")
    client.connect()
    c = FakeCoordinator(client=client, federation=fed.federation, keys=fed.coordinator, registry=fed.registry)
    yield c.start()
    c.stop()


def announce(c: FakeCoordinator, *, round: int, weights, base=None) -> dict[str, np.ndarray]:
    """Round ``round`` of ``weights`` (the next model, base plus a q8 delta, when ``base`` is
    given): whole on ``model``, then as the delta on ``round``, as the coordinator does."""
    fields = dict(federation=c.federation, round=round, deadline=int(T0 + 3600), quorum=1, train=c.train,
                  model=c.model, signing_key=c.keys.signing, update_dtype="q8")
    delta = None
    if base is not None:
        change = {k: (weights[k] - base[k]).astype(np.float32) for k in base}
        delta, _ = quantise_with_feedback(change, None)
        weights = apply(base, delta.dequantised())
    whole = make_announcement(**fields, tensors=weights)
    c.client.publish(T.model, whole, qos=1, retain=True).result(5.0)
    payload = whole if delta is None else make_announcement(**fields, tensors=weights,
                                                            delta=(model_sha256(base), delta))
    c.round, c.model_sha256 = round, model_sha256(weights)
    c.shapes = {k: v.shape for k, v in weights.items()}
    c.client.publish(T.round, payload, qos=1, retain=True).result(5.0)
    return weights


def nudged(weights, seed):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in weights.items()}


def test_a_site_that_lacks_the_base_fetches_the_whole_model_and_then_follows_deltas(fed, broker, coordinator):
    m1 = tiny_weights()
    m2 = announce(coordinator, round=2, weights=nudged(m1, 1), base=m1)  # a new site holds no m1
    d = Running(fed, broker, data=ALL_IMAGES)
    got2 = wait_for(lambda: coordinator.accepted.get(("site-a", 2)), what="round 2 update")
    assert got2.steps == 40 and coordinator.rejected == []
    folder = d.service.folder
    assert model_sha256(load_held(folder)) == model_sha256(m2)
    stored = read_document(folder.announcement_path.read_bytes()[80:]).metadata
    assert "base_sha256" not in stored, "round 2 came whole, from the model topic"
    wait_for(lambda: T.model not in d.service.client.subscriptions, what="the model topic left")
    # the update went as q8: the residual it left is kept for the next round's, not for its own again
    residual = load_residual(folder, round=3)
    assert residual is not None and set(residual) == set(m1) and any(np.abs(r).max() > 0 for r in residual.values())
    assert load_residual(folder, round=2) is None
    wait_for(lambda: d.state.phase == "idle" and d.service.worker_pid is None, what="idle after round 2")

    # round 3 as a delta from m2, which the site holds: no fetch
    m3 = announce(coordinator, round=3, weights=nudged(m2, 2), base=m2)
    got3 = wait_for(lambda: coordinator.accepted.get(("site-a", 3)), what="round 3 update")
    assert got3.steps == 40 and coordinator.rejected == []
    assert model_sha256(d.service.announcement.tensors) == model_sha256(m3)
    assert T.model not in d.service.client.subscriptions
    assert read_document(folder.announcement_path.read_bytes()[80:]).metadata["base_sha256"] == model_sha256(m2)
    wait_for(lambda: d.state.phase == "idle" and d.service.worker_pid is None, what="idle after round 3")
    assert d.stop() == 0

    # rounds 4 and 5 go by while the site is stopped: it holds m3, round 5 is a delta from m4
    m4 = announce(coordinator, round=4, weights=nudged(m3, 3), base=m3)
    m5 = announce(coordinator, round=5, weights=nudged(m4, 4), base=m4)
    d = Running(fed, broker, data=ALL_IMAGES)
    got5 = wait_for(lambda: coordinator.accepted.get(("site-a", 5)), what="round 5 update after the fallback")
    assert got5.steps == 40 and coordinator.rejected == []
    assert model_sha256(d.service.announcement.tensors) == model_sha256(m5)
    wait_for(lambda: T.model not in d.service.client.subscriptions, what="the model topic left again")
    assert d.stop() == 0


def test_the_site_sends_q8_updates_when_the_round_says_so(fed, broker, coordinator):
    coordinator.receipts = False  # the update stays in the outbox, where the test reads it
    announce(coordinator, round=1, weights=tiny_weights())
    d = Running(fed, broker, data=ALL_IMAGES)
    wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="round 1 update")
    outbox = d.service.folder.outbox
    (entry,) = wait_for(lambda: outbox.entries(), what="the stored update")
    payload = outbox.get(*entry)
    v = verify_update(payload, topic_site="site-a", coordinator_keys=coordinator.keys.box,
                      registry=coordinator.registry)
    assert sorted(e.dtype for e in v.document.entries) == ["F32", "I8"]
    params = sum(v.size for v in tiny_weights().values())
    assert len(payload) < params + 1024  # a byte per value, and a small header
    d.stop()


def stored_base(folder) -> str | None:
    """The stored announcement's ``base_sha256``: None when the round came whole."""
    return read_document(folder.announcement_path.read_bytes()[80:]).metadata.get("base_sha256")


def test_a_site_whose_held_model_is_damaged_fetches_the_whole_model_and_trains(fed, broker, coordinator):
    m1 = announce(coordinator, round=1, weights=tiny_weights())
    d = Running(fed, broker, data=ALL_IMAGES)
    wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="round 1 update")
    wait_for(lambda: d.state.phase == "idle" and d.service.worker_pid is None, what="idle after round 1")
    m2 = announce(coordinator, round=2, weights=nudged(m1, 1), base=m1)
    wait_for(lambda: coordinator.accepted.get(("site-a", 2)), what="round 2 update")
    wait_for(lambda: d.state.phase == "idle" and d.service.worker_pid is None, what="idle after round 2")
    folder = d.service.folder
    assert stored_base(folder) == model_sha256(m1), "round 2 was rebuilt from the delta"
    assert d.stop() == 0

    # one bit of the held model flips while the site is stopped; round 3 is a delta from m2
    raw = bytearray(folder.path.joinpath("model.safetensors").read_bytes())
    raw[-1] ^= 1
    folder.path.joinpath("model.safetensors").write_bytes(bytes(raw))
    assert model_sha256(load_held(folder)) != model_sha256(m2)
    m3 = announce(coordinator, round=3, weights=nudged(m2, 2), base=m2)
    d = Running(fed, broker, data=ALL_IMAGES)
    got3 = wait_for(lambda: coordinator.accepted.get(("site-a", 3)), what="round 3 update from the whole model")
    assert got3.steps == 40 and coordinator.rejected == []
    folder = d.service.folder
    assert stored_base(folder) is None, "round 3 came whole, from the model topic"
    assert model_sha256(load_held(folder)) == model_sha256(m3)
    wait_for(lambda: T.model not in d.service.client.subscriptions, what="the model topic left")
    assert d.stop() == 0


def test_a_site_whose_float32_arithmetic_differs_takes_the_whole_model(fed, broker, coordinator, monkeypatch):
    """The site holds the base, but base plus delta does not give the signed sha256 here (as on a
    device that flushes subnormals to zero): it must not be stuck, it fetches the whole model."""
    import fednca.wire_round as wire_round

    def off_by_one_ulp(base, delta):
        out = apply(base, delta)
        first = sorted(out)[0]
        out[first].flat[0] = np.nextafter(out[first].flat[0], np.float32(np.inf))
        return out

    m1 = announce(coordinator, round=1, weights=tiny_weights())
    d = Running(fed, broker, data=ALL_IMAGES)
    wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="round 1 update")
    wait_for(lambda: d.state.phase == "idle" and d.service.worker_pid is None, what="idle after round 1")
    monkeypatch.setattr(wire_round, "apply", off_by_one_ulp)
    m2 = announce(coordinator, round=2, weights=nudged(m1, 1), base=m1)
    got2 = wait_for(lambda: coordinator.accepted.get(("site-a", 2)), what="round 2 update from the whole model")
    assert got2.steps == 40 and coordinator.rejected == []
    folder = d.service.folder
    assert stored_base(folder) is None, "round 2 came whole, from the model topic"
    assert model_sha256(d.service.announcement.tensors) == model_sha256(m2)
    assert model_sha256(load_held(folder)) == model_sha256(m2)
    wait_for(lambda: T.model not in d.service.client.subscriptions, what="the model topic left")
    assert d.stop() == 0
