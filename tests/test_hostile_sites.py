"""Hostile sites beside honest ones, real processes on a real mosquitto: the honest sites still count.

Each federation is what tests/test_e2e_mosquitto.py runs (mosquitto from the generated files,
``fednca coordinator run``, one ``fednca daemon`` per honest site), started from the same warm
model (``coordinator init --model``: a tiny NCA trained briefly here on pooled phantom images, so
that the federation's Dice means something) with the same seeds. Compared with the run of the
honest sites alone:

* a poisoning site (tests/hostile_support.py, a process with its enrolled key that sends well
  formed, signed and sealed updates) sends, one per round, huge finite values, an inflated sample
  count, a sign-flipped update, and the negated sum of the others (estimated as ``-(n - 1)`` times
  its own honest delta, since a site never sees the others' updates);
* two daemons run with their wall clock two hours ahead and two hours behind (libfaketime, the
  monotonic clock left alone), beside an honest one.

For each: every honest update is accepted and counted, the coordinator stays up to the last round,
and the test Dice of the stored models on held-out phantom patients of the honest sites stays
within ``DICE_TOLERANCE`` of the honest run's, round by round.

The two other hostile sites of the threat model have their own files: a flooding site in
tests/test_hostile_flood.py, a session thief (a site taking over the coordinator's or another
site's session) in tests/test_session_binding.py and at the end of tests/test_hostile_flood.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from e2e_support import FEDERATION, MODEL, TRAIN, Federation, View, wait_until
from fednca import modelfile, wire
from fednca.config import train_preset
from fednca.aggregate import global_norm
from fednca.data import Dataset, concat
from fednca.keys import read_coordinator_keys, read_registry
from fednca.model import build
from fednca.phantom import phantom_dataset
from fednca.train import Trainer, evaluate
from hostile_support import ATTACKS, HUGE, INFLATED_SAMPLES
from mosquitto_fixture import MOSQUITTO

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]

HONEST = ("site0", "site1", "site2")
HOSTILE = "site3"  # enrolled like the others; its daemon never runs, tests/hostile_support.py does
ROUNDS = len(ATTACKS)  # one attack per round
SKEW_ROUNDS = 2
SKEWS = {"site0": "+2h", "site1": "-2h"}  # site2 keeps the true time
TRAIN_IMAGES = 8  # per site: frames 0-7, the site's first patient
TEST_START, TEST_COUNT = 64, 16  # held out: patients 8 and 9 of each honest site
WARM_STEPS = 200  # of batch 8 on the pooled images: test Dice ~0.55 (from ~0 for fresh weights)
# The federation fine-tunes the warm model, as one would a pre-trained one: a smaller step than the
# preset's 1e-3, at which one round of four steps on one patient per site moves this tiny model's
# Dice by a few hundredths whichever honest sites took part, too coarse to compare runs by.
FINE_TUNE = dataclasses.replace(TRAIN, lr=1e-4)
DICE_FLOOR = 0.3
PASSES = 4  # stochastic passes averaged per test image, as fednca segment does
DICE_TOLERANCE = 0.02
ROUND_TIMEOUT = 120.0  # one round of three tiny trainers takes ~10 s on two busy cores: a bound only
FAKETIME = shutil.which("faketime")


@dataclass(frozen=True)
class Run:
    """What a finished federation left behind, kept after its processes are gone."""

    records: list[dict]
    models: dict[int, dict[str, np.ndarray]]  # round -> the model that round was announced with
    honest_norms: dict[int, list[float]]  # round -> the honest sites' delta norms, as stored
    logs: dict[str, str]
    offsets: dict[str, list[float]]  # site -> clock_offset_s values it reported

    def aggregated(self, rnd: int) -> dict:
        return next(r for r in self.records if r["kind"] == "round_aggregated" and r["round"] == rnd)

    def verdicts(self, site: str, rnd: int) -> list[tuple[str, str | None]]:
        return [(r["kind"], r.get("reason")) for r in self.records
                if r.get("site") == site and r.get("round") == rnd and r["kind"].startswith("update_")]


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory) -> Path:
    """A model folder: the tiny NCA trained briefly on pooled phantom images (every site's training
    frames), the first global model of every federation here."""
    torch.set_num_threads(1)
    pooled = concat([phantom_dataset(site=s, count=TRAIN_IMAGES, size=MODEL.input_size, seed=0)
                     for s in range(len(HONEST) + 1)])
    trainer = Trainer(model_cfg=MODEL, train_cfg=train_preset(local_epochs=1, batch_size=8), data=pooled, seed=0)
    trainer.run(max_steps=WARM_STEPS)
    return modelfile.save(tmp_path_factory.mktemp("warm") / "model", trainer.weights(), MODEL)


@pytest.fixture(scope="module")
def test_images() -> Dataset:
    return concat([phantom_dataset(site=i, count=TEST_COUNT, size=MODEL.input_size, seed=0, start=TEST_START)
                   for i in range(len(HONEST))])


def dice_of(tensors: dict[str, np.ndarray], data: Dataset) -> float:
    """Mean test Dice of a stored model on ``data`` (one pass, seeded: the same for equal weights)."""
    model = build(MODEL, seed=0)
    state = model.state_dict()
    model.load_state_dict({name: torch.from_numpy(np.array(tensors[name])) for name in state}, strict=True)
    return evaluate(model, data, passes=PASSES, seed=0).dice_mean


def _finish(fed: Federation, rounds: int, status: View | None = None) -> Run:
    """Wait for the coordinator to run its last round and exit 0, then gather what the run left
    (with ``status``, the clock offsets the sites reported in their telemetry)."""
    wait_until(lambda: fed.returncode("coordinator") is not None, timeout=ROUND_TIMEOUT * rounds,
               what=f"the coordinator to finish {rounds} rounds", federation=fed)
    assert fed.returncode("coordinator") == 0, fed.tails("coordinator")
    fed.check_alive()  # every daemon (and the poisoning site) is still running
    records = fed.records()
    models = {r: fed.store.load_model(r) for r in range(1, rounds + 2)}
    keys, registry = read_coordinator_keys(fed.cfg.keys_dir), read_registry(fed.cfg.registry_path)
    shapes = {name: value.shape for name, value in models[1].items()}
    norms: dict[int, list[float]] = {}
    for r in records:
        if r["kind"] == "update_accepted" and r["site"] in HONEST:
            rnd = r["round"]
            payload = fed.store.read_update(rnd, r["site"], r["update_id"])
            update = wire.open_update(payload, topic_site=r["site"], coordinator_keys=[keys.box], registry=registry,
                                      federation=FEDERATION, round=rnd, base_sha256=wire.model_sha256(models[rnd]),
                                      shapes=shapes)  # fmt: skip
            norms.setdefault(rnd, []).append(global_norm(update.delta))
    offsets: dict[str, list[float]] = {}
    if status is not None:
        for message in status.messages:
            site = message.topic.rsplit("/", 1)[-1]
            try:
                body = json.loads(message.payload)
            except ValueError:
                continue  # the last will, "offline"
            if isinstance(body, dict) and body.get("clock_offset_s") is not None:
                offsets.setdefault(site, []).append(float(body["clock_offset_s"]))
    logs = {name: fed.log(name) for name in fed.processes.parties}
    return Run(records=records, models=models, honest_norms=norms, logs=logs, offsets=offsets)


def _federation(root: Path, warm: Path, *, sites: int, rounds: int) -> Federation:
    # Every site is the quorum: a round waits for all, so a site slowed by the machine's load is
    # never left out by the grace period (each run asserts that every site was counted).
    return Federation(root=root, sites=sites, rounds=rounds, quorum=sites, grace=3.0, initial_model=warm,
                      train=FINE_TUNE)


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory, warm_model) -> Run:
    """The honest sites alone: the reference every other run is compared with."""
    fed = _federation(tmp_path_factory.mktemp("honest"), warm_model, sites=len(HONEST), rounds=ROUNDS)
    try:
        fed.start_broker()
        fed.start()
        return _finish(fed, ROUNDS)
    finally:
        fed.close()


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory, warm_model) -> tuple[Run, list[dict]]:
    """The honest sites and the poisoning site (one attack a round); what it sent, per round."""
    root = tmp_path_factory.mktemp("poisoned")
    fed = _federation(root, warm_model, sites=len(HONEST) + 1, rounds=ROUNDS)
    sent = root / "sent.jsonl"
    try:
        fed.start_broker()
        argv = [sys.executable, str(Path(__file__).with_name("hostile_support.py")),
                "--config", str(fed.site_paths[HOSTILE].config), "--sites", str(len(HONEST) + 1),
                "--attacks", ",".join(ATTACKS), "--out", str(sent)]  # fmt: skip
        fed.processes.start_program(HOSTILE, argv)  # first: it is ready before the honest daemons are
        fed.start_coordinator()
        for site in HONEST:
            fed.start_site(site)
        run = _finish(fed, ROUNDS)
    finally:
        fed.close()
    return run, [json.loads(line) for line in sent.read_text().splitlines()]


@pytest.fixture(scope="module")
def skewed_run(tmp_path_factory, warm_model) -> Run:
    """site0's wall clock two hours ahead, site1's two hours behind, site2's true."""
    if FAKETIME is None:
        pytest.skip("faketime (Debian's libfaketime) is not installed: no daemon can run with a shifted wall clock")
    fed = _federation(tmp_path_factory.mktemp("skewed"), warm_model, sites=len(HONEST), rounds=SKEW_ROUNDS)
    try:
        fed.start_broker()
        status = fed.observe([f"status/{site}" for site in SKEWS])
        fed.start_coordinator()
        for site in HONEST:
            skew = SKEWS.get(site)
            if skew is None:
                fed.start_site(site)
            else:  # only the wall clock moves: the daemon times rounds on its monotonic clock
                fed.start_site(site, wrapper=(FAKETIME, "-f", skew), env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        return _finish(fed, SKEW_ROUNDS, status=status)
    finally:
        fed.close()


def _assert_honest_counted(run: Run, rounds: int) -> None:
    finished = [r["round"] for r in run.records if r["kind"] == "federation_finished"]
    assert finished == [rounds], f"federation_finished lines: {finished}"
    for rnd in range(1, rounds + 1):
        aggregated = run.aggregated(rnd)
        assert set(HONEST) <= set(aggregated["sites"]), f"round {rnd} counted {aggregated['sites']}"
        for site in HONEST:
            assert run.verdicts(site, rnd) == [("update_accepted", None)], (site, rnd, run.verdicts(site, rnd))


def _assert_dice_close(run: Run, reference: Run, rounds: int, data: Dataset, what: str) -> list[float]:
    """Every model the run produced segments; the last one as well as the honest run's, within
    ``DICE_TOLERANCE``. The test Dice of each round's model, in order."""
    scores = [dice_of(run.models[rnd], data) for rnd in range(2, rounds + 2)]
    assert min(scores) > DICE_FLOOR, f"{what}: a model stopped segmenting: test Dice by round {scores}"
    final, reference_final = scores[-1], dice_of(reference.models[rounds + 1], data)
    assert reference_final > DICE_FLOOR, f"the honest run's model after round {rounds}: Dice {reference_final:.3f}"
    assert abs(final - reference_final) <= DICE_TOLERANCE, (
        f"{what}: after round {rounds} test Dice {final:.3f}, honest run {reference_final:.3f} (by round {scores})")
    return scores


def test_the_honest_run_learns_from_a_warm_start(honest_run, test_images):
    _assert_honest_counted(honest_run, ROUNDS)
    first, final = dice_of(honest_run.models[1], test_images), dice_of(honest_run.models[ROUNDS + 1], test_images)
    assert first > DICE_FLOOR and final > DICE_FLOOR, (first, final)
    # The federation trains: every round moved the model, by honest deltas.
    for rnd in range(1, ROUNDS + 1):
        assert honest_run.aggregated(rnd).get("model_kept") is None, honest_run.aggregated(rnd)
        assert not all(np.array_equal(honest_run.models[rnd][n], v) for n, v in honest_run.models[rnd + 1].items())


def test_a_poisoning_site_moves_the_model_no_further_than_an_honest_one(poisoned_run, honest_run, test_images):
    run, sent = poisoned_run
    _assert_honest_counted(run, ROUNDS)
    assert [s["attack"] for s in sent[:ROUNDS]] == list(ATTACKS), sent
    assert [s["round"] for s in sent[:ROUNDS]] == list(range(1, ROUNDS + 1)), sent
    for s in sent[:ROUNDS]:
        rnd, attack = s["round"], s["attack"]
        # Every poisoned update was well formed: accepted, counted with the honest ones.
        assert run.verdicts(HOSTILE, rnd) == [("update_accepted", None)], (attack, run.verdicts(HOSTILE, rnd))
        assert HOSTILE in run.aggregated(rnd)["sites"], (attack, run.aggregated(rnd))
        # The bounded aggregate was published: the honest sites' work of the round was not thrown away.
        assert run.aggregated(rnd).get("model_kept") is None, (attack, run.aggregated(rnd))
        # ...and it pulled the model no further than the honest deltas reach.
        step = global_norm({n: run.models[rnd + 1][n].astype(np.float64) - run.models[rnd][n]
                            for n in run.models[rnd]})
        honest = max(run.honest_norms[rnd])
        assert step <= 2 * honest + 1e-6, f"{attack}: the model moved {step:.3g}, honest deltas at most {honest:.3g}"
        if attack == "huge":
            assert s["norm"] > HUGE and math.isfinite(s["norm"])
        elif attack == "inflated":
            assert s["samples"] == INFLATED_SAMPLES
            accepted = next(r for r in run.records if r["kind"] == "update_accepted" and r["update_id"] == s["update_id"])
            assert accepted["samples"] == INFLATED_SAMPLES  # the claim was taken as it was made, and bounded
        elif attack == "negated_sum":
            assert s["norm"] == pytest.approx(len(HONEST) * s["honest_norm"], rel=1e-4)
        else:
            assert s["norm"] == pytest.approx(s["honest_norm"], rel=1e-6)
    _assert_dice_close(run, honest_run, ROUNDS, test_images, "poisoning site")


@pytest.mark.parametrize("site", sorted(SKEWS))
def test_a_site_whose_clock_is_two_hours_off_still_counts(site, skewed_run, honest_run, test_images):
    # The daemon really ran with its wall clock shifted: it says so in its telemetry.
    offsets = skewed_run.offsets.get(site)
    assert offsets, f"{site} never reported its clock offset{skewed_run.logs[site][-2000:]}"
    sign = 1 if SKEWS[site].startswith("+") else -1
    assert abs(offsets[-1] - sign * 7200) < 120, (site, SKEWS[site], offsets)
    _assert_honest_counted(skewed_run, SKEW_ROUNDS)
    for rnd in range(1, SKEW_ROUNDS + 1):  # no round it was to train looked over to it
        assert f"round {rnd} came after its deadline" not in skewed_run.logs[site], skewed_run.logs[site][-2000:]
    _assert_dice_close(skewed_run, honest_run, SKEW_ROUNDS, test_images, f"{site} at {SKEWS[site]}")
