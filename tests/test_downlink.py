"""The global model sent down as an 8-bit delta (broker/downlink.py): defined by the coordinator as
base plus dequantised delta, rebuilt bit for bit by a receiver that holds the base, the residual
carried from round to round and across a restart; the whole model on the retained model topic."""

from __future__ import annotations

import numpy as np
import pytest
from test_coordinator import SITES, Federation, expected_model, world  # noqa: F401 - the fixture

from fednca import wire
from fednca.quantise import apply
from fednca_broker.config import FederationConfig
from fednca_broker.downlink import Downlink
from fednca_broker.global_model import GlobalModel
from fednca_broker.store import RoundStore
from fednca.topics import Topics

FED = "fed"
T = Topics(FED)


def model(seed: int, shapes=((40, 3), (7,))) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}


def test_the_defined_model_is_the_base_plus_the_stored_delta_and_a_restart_announces_the_same(tmp_path):
    store = RoundStore(root=tmp_path, federation=FED)
    previous = GlobalModel.of(model(1))
    candidate = {k: v + 0.01 * model(2)[k] for k, v in previous.tensors.items()}
    got = Downlink(store=store, encoding="q8").define(round=2, previous=previous, candidate=candidate)
    new = GlobalModel.of(got)
    for k in candidate:  # within half a quantisation step of the aggregate
        step = np.abs(candidate[k] - previous.tensors[k]).max() / 127
        assert np.abs(got[k] - candidate[k]).max() <= step / 2 * 1.01
    again = Downlink(store=store, encoding="q8")  # a restarted coordinator
    base_sha, delta = again.announced(2, new)
    assert base_sha == previous.sha256
    assert wire.model_sha256(apply(previous.tensors, delta.dequantised())) == new.sha256
    assert again.announced(2, previous) is None, "a delta for another model is not used"
    assert Downlink(store=store, encoding="off").announced(2, new) is None
    off = Downlink(store=store, encoding="off").define(round=3, previous=new, candidate=candidate)
    assert GlobalModel.of(off).sha256 == GlobalModel.of(candidate).sha256  # off: the aggregate itself
    assert not Downlink(store=store, encoding="off").path(3).exists()


def test_the_server_residual_keeps_the_published_models_on_the_aggregates_path(tmp_path):
    store = RoundStore(root=tmp_path, federation=FED)
    link = Downlink(store=store, encoding="q8")
    rng = np.random.default_rng(3)
    current = GlobalModel.of(model(4))
    start = {k: v.copy() for k, v in current.tensors.items()}
    true_sum = {k: np.zeros_like(v) for k, v in start.items()}
    for rnd in range(2, 60):
        # each round's aggregate moves a little, with one large value per tensor setting the scale
        step = {k: (rng.standard_normal(v.shape) * 1e-4 + 2e-5).astype(np.float32) for k, v in start.items()}
        for v in step.values():
            v.flat[0] = 0.05
        candidate = {k: current.tensors[k] + step[k] for k in step}
        for k in step:
            true_sum[k] += step[k]
        current = GlobalModel.of(link.define(round=rnd, previous=current, candidate=candidate))
    residual = link.load(59).residual
    for k in start:
        drift = current.tensors[k] - start[k]
        np.testing.assert_allclose(drift + residual[k], true_sum[k], atol=2e-5)
        assert np.abs(drift - true_sum[k]).max() <= 0.05 / 127  # within one round's step, not 58 of them


def test_a_refused_aggregate_keeps_the_previous_model_exactly(tmp_path):
    store = RoundStore(root=tmp_path, federation=FED)
    previous = GlobalModel.of({"t0": np.array([-0.0, 1.0, 2.0], np.float32)})
    link = Downlink(store=store, encoding="q8")
    kept = link.define(round=2, previous=previous, candidate=previous.tensors)
    assert GlobalModel.of(kept).sha256 == previous.sha256


def test_the_coordinator_announces_rounds_as_deltas_and_the_whole_model_on_the_model_topic(world, tmp_path):
    cfg = FederationConfig(name=FED, model=world["cfg"], max_rounds=None, model_delta="q8", update_dtype="q8")
    fed = Federation(world, tmp_path, config=cfg).start()
    first = fed.announcement()
    assert first.header.base_sha256 is None and first.header.update_dtype == "q8"
    for site in SITES:
        fed.send(site)
    fed.coordinator.step()
    assert fed.coordinator.round == 2
    key = world["keys"].signing.verify_key
    payload, whole = fed.broker.retained(T.round), fed.broker.retained(T.model)
    with pytest.raises(wire.WireError) as e:
        wire.open_announcement(payload, coordinator_verify_key=key, federation=FED)
    assert e.value.reason == wire.Reason.WRONG_BASE_MODEL
    ann = wire.open_announcement(payload, coordinator_verify_key=key, federation=FED, held=[world["model"]])
    full = wire.open_announcement(whole, coordinator_verify_key=key, federation=FED)
    assert ann.header.round == full.header.round == 2
    assert ann.header.base_sha256 == world["base"]
    assert wire.model_sha256(ann.tensors) == full.header.model_sha256 == fed.coordinator.model_sha256
    assert len(payload) < len(whole) / 3
    want = expected_model(world)
    for k, v in want.items():  # the aggregate, within half a step of its change
        step = np.abs(v - world["model"][k]).max() / 127
        assert np.abs(ann.tensors[k] - v).max() <= step / 2 * 1.01 + 1e-7

    # a restarted coordinator announces the same model as the same delta
    fed.coordinator.wait_published(1)
    again = Federation(world, tmp_path, broker=fed.broker, config=cfg).start()
    assert again.coordinator.round == 2
    ann2 = wire.open_announcement(fed.broker.retained(T.round), coordinator_verify_key=key, federation=FED,
                                  held=[world["model"]])
    assert ann2.header.model_sha256 == ann.header.model_sha256
