"""Real daemons (training the tiny model) and the real coordinator on the in-memory broker, with
secure aggregation on: masked updates through the outbox, one answer per site, a site that falls
silent after masking, and the state a site keeps between masking and answering."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from daemon_support import TINY_MODEL, TINY_TRAIN, Federation, tiny_weights, wait_for
from nacl.utils import random as nacl_random
from test_daemon_service import ALL_IMAGES, Running

from nacl.bindings import crypto_scalarmult_base

from fednca.aggregate import AggregationConfig
from fednca.fixedpoint import FixedPoint
from fednca.secagg_params import RosterEntry, SecureParams, secagg_field
from fednca.wire_secagg import make_unmask_request, open_unmask_answer
from fednca_daemon.secure_site import SecureSite
from fednca.round_keys import ROUND_KEYS_SECRET_FILE, RoundKeyBook, make_batch, read_secrets, write_book, write_secrets
from fednca.transport.memory import MemoryBroker
from fednca_broker.config import FederationConfig
from fednca_broker.coordinator import Coordinator
from fednca_broker.rounds import RoundConfig
from fednca_broker.secure_config import SecureAggregationConfig
from fednca_broker.secure_rounds import ROUND_KEY_BOOK
from fednca_broker.store import RoundStore

SITES = ("site-a", "site-b", "site-c")
PLAIN_RULES = AggregationConfig(method="fedavg", clip_norm=None, median_norm_factor=None, max_weight_ratio=None)


class World:
    def __init__(self, root, *, threshold: int = 2) -> None:
        self.fed = Federation(root, sites=SITES)
        self.broker = MemoryBroker()
        self.store = RoundStore(root=root / "store", federation="fed")
        book = RoundKeyBook()
        for s in SITES:
            secrets, public = make_batch(site=s, signing_key=self.fed.site_keys[s].signing, start=0, count=4,
                                         rand=nacl_random)
            write_secrets(root / s / "keys" / ROUND_KEYS_SECRET_FILE, secrets)
            book = book.add(public, self.fed.registry)
        write_book(self.store.folder / ROUND_KEY_BOOK, book)
        config = FederationConfig(name="fed", model=TINY_MODEL, train=TINY_TRAIN, max_rounds=1, aggregation=PLAIN_RULES,
                                  secure_aggregation=SecureAggregationConfig(enabled=True, threshold=threshold,
                                                                             resend_s=0.5, unmask_timeout_s=60),
                                  rounds=RoundConfig(quorum_count=len(SITES)))
        self.initial = tiny_weights()
        self.coordinator = Coordinator(config=config, store=self.store, keys=self.fed.coordinator,
                                       registry=self.fed.registry, client=self.broker.client(client_id="coordinator"),
                                       clock=time.time, initial_model=self.initial)
        self.coordinator.start()
        self.thread = threading.Thread(target=lambda: self.coordinator.run_until(poll=0.05), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.coordinator.stop()
        self.thread.join(10)
        self.coordinator.close()


@pytest.mark.slow
def test_daemons_mask_answer_once_and_the_round_aggregates(tmp_path):
    world = World(tmp_path)
    daemons = {s: Running(world.fed, world.broker, s, data=ALL_IMAGES) for s in SITES}
    # site-c masks, then falls silent (as if killed before the request reached it)
    silent = daemons["site-c"].service.secure
    silent.answer = lambda payload: None
    try:
        wait_for(lambda: world.coordinator.finished, timeout=120, what="the secure round aggregated")
    finally:
        for d in daemons.values():
            d.stop()
        world.stop()
    log = [r for r in world.store.read_log() if r.kind == "round_aggregated"]
    assert len(log) == 1 and sorted(log[0].sites) == list(SITES) and log[0].model_kept is None
    model = world.coordinator.model
    assert any(not np.array_equal(model[k], world.initial[k]) for k in model)
    # the next announcement (the final model) made every site erase round 1's seeds and its spent round key
    for s in SITES:
        folder = tmp_path / s / "state" / "secagg"
        assert not list(folder.glob("round-*.json")) and not list(folder.glob("answer-*"))
        assert 0 not in read_secrets(folder / ROUND_KEYS_SECRET_FILE)
    # a and b answered once each; c's self-mask seed was rebuilt from their shares
    answers = sorted(p.name for p in (world.store.folder / "secagg" / "1" / "answers").iterdir())
    assert answers == ["site-a.bin", "site-b.bin"]


def test_a_site_keeps_what_its_answer_needs_across_a_restart_and_answers_one_request(tmp_path):
    keys = Federation(tmp_path, sites=("site-a", "site-b"))
    secrets = {s: {0: nacl_random(32), 1: nacl_random(32)} for s in ("site-a", "site-b")}
    write_secrets(tmp_path / "site-a" / "keys" / ROUND_KEYS_SECRET_FILE, secrets["site-a"])
    roster = tuple(RosterEntry(site=s, x=i + 1, key_index=0, public=crypto_scalarmult_base(secrets[s][0]))
                   for i, s in enumerate(("site-a", "site-b")))
    params = SecureParams(fixed_point=FixedPoint(bound=0.5, frac_bits=20), max_weight=200, threshold=2, roster=roster)

    def site() -> SecureSite:  # a new object: the daemon restarted
        return SecureSite(state_dir=tmp_path / "site-a" / "state", key_dir=tmp_path / "site-a" / "keys",
                          site="site-a", federation="fed", signing_key=keys.site_keys["site-a"].signing,
                          coordinator=keys.coordinator.public)

    site().folder.mkdir(parents=True)
    record = {"round": 1, "key_index": 0, "secret": secrets["site-a"][0].hex(), "self_seed": "11" * 32,
              "params": secagg_field.format(params)}
    (site().folder / "round-1.json").write_text(json.dumps(record))
    request = make_unmask_request(federation="fed", site="site-a", round=1, survivors=("site-a", "site-b"), missing=(),
                                  shares={}, signing_key=keys.coordinator.signing)
    first = site().answer(request)
    assert first is not None and site().answer(request) == first  # asked again: the same bytes
    answer = open_unmask_answer(first, topic_site="site-a", coordinator_keys=keys.coordinator.box,
                                registry=keys.registry, federation="fed")
    assert answer.self_seed == bytes.fromhex("11" * 32) and answer.pair_seeds == {}
    other = make_unmask_request(federation="fed", site="site-a", round=1, survivors=("site-a",), missing=("site-b",),
                                shares={}, signing_key=keys.coordinator.signing)
    assert site().answer(other) is None  # one answer per round: other lists are refused
    both = make_unmask_request(federation="fed", site="site-a", round=2, survivors=("site-a", "site-b"),
                               missing=("site-b",), shares={}, signing_key=keys.coordinator.signing)
    assert site().answer(both) is None  # no masked update of round 2 here (and the lists overlap)
    write_secrets(site().folder / ROUND_KEYS_SECRET_FILE, secrets["site-a"])
    site().forget_before(2)
    assert not (site().folder / "round-1.json").exists() and not (site().folder / "answer-1.bin").exists()
    assert list(read_secrets(site().folder / ROUND_KEYS_SECRET_FILE)) == [1]  # the spent round key is erased


def test_a_round_masked_once_is_never_masked_again_over_other_work(tmp_path):
    # The same self-mask seed and round key over two different deltas would hand a coordinator that
    # saw both updates their difference: a second build of a round from other work is refused.
    from fednca.train import Trainer
    from fednca.phantom import phantom_dataset
    from fednca.wire import model_sha256, open_announcement
    from fednca.wire_round import make_announcement
    from fednca_daemon.secure_site import SecureAggregationRefused

    keys = Federation(tmp_path, sites=("site-a", "site-b"))
    secrets = {s: {0: nacl_random(32)} for s in ("site-a", "site-b")}
    write_secrets(tmp_path / "site-a" / "keys" / ROUND_KEYS_SECRET_FILE, secrets["site-a"])
    roster = tuple(RosterEntry(site=s, x=i + 1, key_index=0, public=crypto_scalarmult_base(secrets[s][0]))
                   for i, s in enumerate(("site-a", "site-b")))
    params = SecureParams(fixed_point=FixedPoint(bound=0.5, frac_bits=20), max_weight=200, threshold=2, roster=roster)
    weights = tiny_weights()
    ann = open_announcement(
        make_announcement(federation="fed", round=3, deadline=2_000_000_000, quorum=2, train=TINY_TRAIN,
                          model=TINY_MODEL, tensors=weights, signing_key=keys.coordinator.signing, secagg=params),
        coordinator_verify_key=keys.coordinator.signing.verify_key, federation="fed")
    trainer = Trainer(model_cfg=TINY_MODEL, train_cfg=TINY_TRAIN, data=phantom_dataset(site=0, count=8, size=16),
                      low_memory=True, weights={k: np.array(v) for k, v in weights.items()})
    extra = dict(round=3, base_sha256=model_sha256(weights), round_start=0, planned=40, loss_sum=3.0, loss_steps=2)
    trainer.run(max_steps=2)
    first = trainer.checkpoint(**extra)
    trainer.run(max_steps=2)
    later = trainer.checkpoint(**extra)

    def site() -> SecureSite:  # a new object each time: as after a restart
        return SecureSite(state_dir=tmp_path / "site-a" / "state", key_dir=tmp_path / "site-a" / "keys",
                          site="site-a", federation="fed", signing_key=keys.site_keys["site-a"].signing,
                          coordinator=keys.coordinator.public)

    site().build(announcement=ann, checkpoint=first)
    site().build(announcement=ann, checkpoint=first)  # the same work again: the same masked vector, nothing new
    with pytest.raises(SecureAggregationRefused, match="round 3 was masked already"):
        site().build(announcement=ann, checkpoint=later)
