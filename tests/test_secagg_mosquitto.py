"""Secure aggregation in a federation of real processes on a real mosquitto: ``fednca coordinator
run`` and three ``fednca daemon`` processes, round keys enrolled with the two commands an operator
runs. One site is SIGKILLed right after it stored its masked update: the round closes with the
others and the model equals FedAvg of the counted sites' clipped deltas within the fixed-point bound.
"""

from __future__ import annotations

import contextlib
import io
import signal

import numpy as np
import pytest
import yaml

from e2e_support import Federation, wait_until
from fednca.fixedpoint import clip, error_bound
from fednca.round_keys import ROUND_KEYS_PUBLIC_FILE
from fednca.wire_secagg import secagg_field
from fednca_app.cli import main
from fednca_daemon.submission import read_progress
from mosquitto_fixture import MOSQUITTO

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]

ROUND_TIMEOUT = 120.0  # a bound, not a measurement
STORED = r"round 1: update (\w+) stored"


@pytest.fixture
def fed(tmp_path):
    made = Federation(root=tmp_path / "federation", sites=3, rounds=1, quorum=2, grace=6.0)
    yield made
    made.close()


def secure(fed: Federation) -> None:
    """Turn secure aggregation on in coordinator.yaml and enrol each site's round keys."""
    path = fed.cfg.config_path
    data = yaml.safe_load(path.read_text())
    data["aggregation"].update(method="fedavg", clip_norm=None, median_norm_factor=None, max_weight_ratio=None)
    data["secure_aggregation"] = {"enabled": True, "threshold": 2, "resend_s": 1.0, "unmask_timeout_s": 300.0}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with contextlib.redirect_stdout(io.StringIO()):
        for site in fed.sites:
            keys = fed.site_paths[site].keys
            assert main(["keys", "round-keys", str(keys), "--site", site, "--count", "4"]) == 0
            assert main(["coordinator", "round-keys", str(fed.folder), site, str(keys / ROUND_KEYS_PUBLIC_FILE)]) == 0


def test_a_site_killed_after_masking_the_round_closes_with_the_others_and_the_model_is_right(fed):
    secure(fed)
    fed.start_broker()
    fed.start_coordinator()
    victim = "site2"
    fed.start_site(victim)
    wait_until(lambda: fed.site_logged(victim, STORED), timeout=ROUND_TIMEOUT, what="the victim's masked update",
               federation=fed)
    fed.kill(victim)  # SIGKILL after masking, before any unmask request can have reached it
    for site in ("site0", "site1"):
        fed.start_site(site)
    wait_until(lambda: fed.returncode("coordinator") == 0, timeout=3 * ROUND_TIMEOUT,
               what="the coordinator to finish", federation=fed)
    for site in ("site0", "site1"):
        assert fed.stop(site) == 0, fed.tails(site)

    counted = check_fedavg(fed)
    assert {"site0", "site1"} <= set(counted)
    # the coordinator never received the victim's answer: its seed, if it was counted, came from shares
    answers = sorted(p.stem for p in (fed.store.folder / "secagg" / "1" / "answers").glob("*.bin"))
    assert victim not in answers and answers == ["site0", "site1"]


def check_fedavg(fed: Federation) -> list[str]:
    """Round 1 aggregated, its model FedAvg of the counted sites' clipped deltas within the bound;
    returns the counted sites."""
    (closed,) = fed.records("round_aggregated")
    assert closed.model_kept is None, closed
    counted = sorted(closed.sites)
    params = secagg_field.parse((fed.store.folder / "secagg" / "1" / "params.json").read_text())
    fp = params.fixed_point
    before, after = fed.store.load_model(1), fed.store.load_model(2)
    # what each counted site trained, from its own checkpoint (the victim's too, if its update arrived)
    progress = {s: read_progress((fed.state_dir(s) / "checkpoint.safetensors").read_bytes()) for s in counted}
    weights = np.array([min(progress[s].samples, params.max_weight) for s in counted], dtype=np.float64)
    worst = 0.0
    for name, base in before.items():
        deltas = [clip(progress[s].weights[name].astype(np.float32) - base, fp) for s in counted]
        want = base + (sum(w * d for w, d in zip(weights, deltas)) / weights.sum()).astype(np.float32)
        worst = max(worst, float(np.max(np.abs(after[name] - want))))
    assert worst <= error_bound(fp) + 1e-6, worst
    return counted


def test_a_coordinator_killed_during_the_unmasking_resumes_it(fed):
    secure(fed)
    fed.start_broker()
    fed.start(kill_coordinator_after="AnswerStored:1")  # SIGKILL right after the first answer is on disk
    wait_until(lambda: fed.returncode("coordinator") is not None, timeout=2 * ROUND_TIMEOUT,
               what="the coordinator to kill itself during the unmasking", federation=fed)
    assert fed.returncode("coordinator") == -signal.SIGKILL, fed.tails("coordinator")
    assert fed.store.load_state().round == 1 and not fed.aggregated(1)
    assert len(list((fed.store.folder / "secagg" / "1" / "answers").glob("*.bin"))) == 1
    fed.start_coordinator()
    wait_until(lambda: fed.returncode("coordinator") == 0, timeout=2 * ROUND_TIMEOUT,
               what="the coordinator to resume the unmasking and finish", federation=fed)
    for site in fed.sites:
        assert fed.stop(site) == 0, fed.tails(site)
    assert check_fedavg(fed) == sorted(fed.sites)
