"""A real coordinator process on a real mosquitto, killed with SIGKILL at points of a round.

Each case sets up a federation (``fednca coordinator init`` and ``enroll``), starts
``python -m fednca_app.cli coordinator run`` with ``FEDNCA_COORDINATOR_KILL_AFTER=ACTION:N`` (it
SIGKILLs itself right after that action), lets five simulated sites publish pre-built sealed
updates, then starts the coordinator again without the hook. The round must close with exactly the
five updates, each counted once, and the same global model as an uninterrupted run. The broker is
never restarted: what the dead coordinator had not acknowledged, mosquitto delivers again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fednca import aggregate, wire
from fednca.aggregate import AggregationConfig
from fednca_app.cli import main
from fednca.keys import SiteKeys, read_coordinator_public
from fednca.transport.mqtt import MqttClient
from fednca_broker.cli import KILL_ENV
from fednca_broker.store import RoundStore

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

SITES = ("s1", "s2", "s3", "s4", "s5")
SAMPLES = dict(zip(SITES, (3, 1, 4, 1, 5)))
FED = "crash"
WAIT = 30.0


@pytest.fixture(scope="module")
def site_keys():
    return {site: SiteKeys.generate() for site in SITES}


def wait_for(condition, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Case:
    """One federation folder, its mosquitto and its sites."""

    def __init__(self, tmp_path, broker, site_keys, name):
        self.folder = tmp_path / name
        self.broker = broker
        assert main(["coordinator", "init", str(self.folder), "--federation", FED, "--broker", broker.url,
                     "--quorum", "5", "--max-rounds", "1"]) == 0  # fmt: skip
        (self.folder / "secrets" / "mqtt-password").write_text(broker.passwords["coordinator"] + "\n")
        for site, keys in site_keys.items():
            assert main(["coordinator", "enroll", str(self.folder), site, bytes(keys.verify_key).hex()]) == 0
        self.store = RoundStore(root=self.folder / "store", federation=FED)
        self.initial = self.store.load_model(1)
        box = read_coordinator_public(self.folder / "keys").box
        rng = np.random.default_rng(11)
        self.deltas = {s: {n: rng.normal(0, 1e-2, a.shape).astype(np.float32) for n, a in sorted(self.initial.items())}
                       for s in SITES}  # fmt: skip
        self.updates = {
            s: wire.make_update(federation=FED, site=s, round=1, base_sha256=wire.model_sha256(self.initial),
                                samples=SAMPLES[s], steps=7, partial=False, metrics={}, delta=self.deltas[s],
                                signing_key=site_keys[s].signing, coordinator_box=box)
            for s in SITES
        }  # fmt: skip
        self.published = False
        self.child: subprocess.Popen[bytes] | None = None

    def expected_sha(self):
        travelled = [({n: a.astype(np.float16).astype(np.float32) for n, a in self.deltas[s].items()}, SAMPLES[s])
                     for s in SITES]  # fmt: skip
        return wire.model_sha256(aggregate.apply(self.initial, aggregate.aggregate(travelled, AggregationConfig())))

    def start(self, kill=None):
        env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
        if kill:
            env[KILL_ENV] = kill
        with open(self.folder / "coordinator.log", "ab") as log:
            self.child = subprocess.Popen(
                [sys.executable, "-m", "fednca_app.cli", "coordinator", "run", str(self.folder), "--poll", "0.1",
                 "--log-level", "debug"], stdout=log, stderr=log, env=env,
            )  # fmt: skip

    def wait_exit(self):
        assert self.child is not None
        try:
            return self.child.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"coordinator still running:\n{self.log()}") from None

    def stop(self):
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL)
            self.child.wait(timeout=10)

    def log(self):
        return (self.folder / "coordinator.log").read_text()[-4000:]

    def announced(self) -> bool:
        return self.broker_retained_round() is not None

    def broker_retained_round(self):
        watcher = MqttClient(url=self.broker.url, client_id="watcher", username="s1",
                             password=self.broker.passwords["s1"], clean_start=True)  # fmt: skip
        try:
            watcher.connect(5)
            watcher.subscribe(f"fednca/{FED}/round")
            message = watcher.receive(0.5)
        finally:
            watcher.disconnect()
        return None if message is None else message.payload

    def publish_updates(self):
        """Every site publishes its update once (QoS 1, acknowledged by the broker)."""
        for site in SITES:
            client = MqttClient(url=self.broker.url, client_id=f"site-{site}", username=site,
                                password=self.broker.passwords[site])  # fmt: skip
            try:
                assert client.connect(5)
                client.publish(f"fednca/{FED}/updates/{site}", self.updates[site]).result(5)
            finally:
                client.disconnect()
        self.published = True

    def run_round(self, kill=None):
        """Start the coordinator; publish once it has announced round 1 (or died trying)."""
        self.start(kill)
        if not self.published:
            wait_for(lambda: self.child.poll() is not None or self.announced(), "round 1 to be announced")
            self.publish_updates()
        return self.wait_exit()

    def check(self, expected):
        state = self.store.load_state()
        assert (state.round, state.status) == (1, "closed"), self.log()
        assert sorted(a.site for a in state.accepted) == sorted(SITES)
        assert wire.model_sha256(self.store.load_model(2)) == expected
        final = wire.open_announcement(self.broker_retained_round(), federation=FED,
                                       coordinator_verify_key=read_coordinator_public(self.folder / "keys").verify)
        assert (final.header.round, final.header.model_sha256) == (2, expected)
        closed = [r for r in self.store.read_log() if r["kind"] == "round_aggregated"]
        assert [sorted(r["sites"]) for r in closed] == [sorted(SITES)]


@pytest.fixture
def case(tmp_path, mosquitto_factory, site_keys):
    cases = []

    def make(name):
        broker = mosquitto_factory(federation=FED, sites=SITES, max_queued_messages=100)
        cases.append(Case(tmp_path, broker, site_keys, name))
        return cases[-1]

    yield make
    for c in cases:
        c.stop()


KILL_POINTS = [
    "SaveState:1",  # round 1 saved, not yet announced
    "StoreUpdate:1",  # an update on disk, the state does not count it yet
    "StoreUpdate:4",
    "SaveState:2",  # updates counted on disk, none acknowledged to the broker
    "Ack:2",  # some acknowledged, others not
    "SendReceipt:3",
    "LogEvent:4",
    "SaveModel:1",  # the next model written, the round not yet logged
    "LogRound:1",  # logged, the federation not yet marked finished
    "Announce:2",  # the final model announced, not yet logged as finished
]


def test_an_uninterrupted_run_and_runs_killed_anywhere_give_the_same_model(case):
    whole = case("whole")
    assert whole.run_round() == 0, whole.log()
    expected = whole.expected_sha()
    whole.check(expected)
    for point in KILL_POINTS:
        killed = case(point.replace(":", "-").lower())
        assert killed.run_round(kill=point) == -signal.SIGKILL, f"{point} was not reached:\n{killed.log()}"
        assert killed.run_round() == 0, f"after a kill at {point}:\n{killed.log()}"
        assert killed.expected_sha() == expected
        killed.check(expected)


def test_sigterm_stops_the_coordinator_cleanly_and_it_resumes(case):
    c = case("sigterm")
    c.start()
    wait_for(c.announced, "round 1 to be announced")
    c.child.send_signal(signal.SIGTERM)
    assert c.wait_exit() == 0, c.log()
    assert c.store.load_state().status == "open"
    c.publish_updates()
    assert c.run_round() == 0, c.log()
    c.check(c.expected_sha())
