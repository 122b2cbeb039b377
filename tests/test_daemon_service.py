"""The daemon's service on the in-memory broker, with a real trainer child process and a small
coordinator made of the wire codec (tests/daemon_support.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from daemon_support import FakeCoordinator, Federation, tiny_weights, wait_for
from fednca.keys import CoordinatorKeys, read_coordinator_public, read_site_keys
from fednca.topics import Topics
from fednca.transport.memory import MemoryBroker
from fednca.wire import make_announcement
from fednca_daemon.gates import Readings
from fednca_daemon.sensors import Sensors
from fednca_daemon.service import Service
from fednca_daemon.submission import _metadata

T0 = 2_000_000_000.0
ALL_IMAGES = {"test_fraction": 0.0}  # every phantom image trains: the step counts below assume 8


class FakeSensors(Sensors):
    """Real process statistics, but a temperature the test sets."""

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__(hwmon=lambda: {})
        self.temperature_c = temperature

    def readings(self) -> Readings:
        return Readings(temperature_c=self.temperature_c, battery_percent=None, charging=None, minute_of_day=600)


class Wall:
    """A wall clock the test moves; it also runs forward with real time, for the rests."""

    def __init__(self, start: float = T0) -> None:
        self.offset = start - time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Running:
    """A service running in a thread of this process."""

    def __init__(self, fed: Federation, broker: MemoryBroker, site: str = "site-a", *, sensors=None, wall=None,
                 clock=None, client=None, **service_args) -> None:
        sections = {k: v for k, v in service_args.items() if k not in ("writer", "retry_base_s")}
        extra = {k: v for k, v in service_args.items() if k in ("writer", "retry_base_s")}
        self.cfg = fed.config(site, **sections)
        wall = wall or Wall()
        self.service = Service(config=self.cfg, client=client or broker.client(client_id=f"daemon-{site}"),
                               site_keys=read_site_keys(self.cfg.keys.site),
                               coordinator=read_coordinator_public(self.cfg.keys.coordinator),
                               sensors=sensors or FakeSensors(), wall=wall, clock=clock or wall, **extra)
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.service.run()), daemon=True)
        self.thread.start()

    @property
    def state(self):
        return self.service.state

    def stop(self) -> int:
        self.service.request_stop()
        self.thread.join(20)
        assert not self.thread.is_alive() and self.result == [0]
        return self.result[0]


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


def status_of(broker: MemoryBroker, site: str = "site-a") -> dict:
    raw = broker.retained(Topics("fed").status(site))
    assert raw is not None
    return json.loads(raw)


@pytest.mark.slow
def test_two_rounds_are_trained_submitted_and_acknowledged_keeping_adam_moments(fed, broker, coordinator):
    weights = tiny_weights()
    coordinator.announce(round=1, deadline=T0 + 3600, weights=weights)
    d = Running(fed, broker, data=ALL_IMAGES)
    got = wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="round 1 update")
    assert got.steps == 40 and not got.partial and got.samples == 8 and "train_loss" in got.metrics
    wait_for(lambda: d.state.phase == "idle" and d.service.worker_pid is None, what="idle after the receipt")
    first_trainer = d.service.trainer_pids[-1]
    assert not psutil.pid_exists(first_trainer) or psutil.Process(first_trainer).status() == psutil.STATUS_ZOMBIE
    assert d.service.folder.outbox.entries() == [] and d.service.folder.load_done().round == 1
    status = status_of(broker)
    assert status["state"] == "idle" and status["last_receipt"] == "accepted" and status["round"] == 1
    assert status["steps"] == 40 and status["progress"] == 1.0 and status["outbox"] == 0

    new_global = {k: (v + got.delta[k]).astype(np.float32) for k, v in weights.items()}
    coordinator.announce(round=2, deadline=T0 + 7200, weights=new_global)
    got2 = wait_for(lambda: coordinator.accepted.get(("site-a", 2)), what="round 2 update")
    assert got2.steps == 40 and len(coordinator.deliveries) == 2 and coordinator.rejected == []
    meta = _metadata(d.service.folder.load_checkpoint())
    assert meta["steps"] == 80 and meta["extra"]["round_start"] == 40
    assert set(meta["adam_steps"].values()) == {80.0}, "Adam moments continue across rounds"
    wait_for(lambda: d.state.phase == "idle" and d.service.worker_pid is None, what="idle again")
    assert d.stop() == 0
    assert status_of(broker)["state"] == "stopped"


def test_partial_work_is_submitted_at_the_deadline(fed, broker, coordinator):
    wall = Wall()
    coordinator.train = coordinator.train.__class__(**{**coordinator.train.to_dict(), "local_epochs": 1000})
    coordinator.announce(round=1, deadline=T0 + 600, weights=tiny_weights())
    d = Running(fed, broker, wall=wall, data=ALL_IMAGES)
    wait_for(lambda: d.state.steps >= 5, what="at least min_steps")
    assert d.state.planned == 4000
    wall.advance(600)
    got = wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="partial update")
    assert got.partial and 5 <= got.steps < 4000
    wait_for(lambda: d.state.phase == "idle", what="idle")
    d.stop()


@pytest.mark.slow
def test_a_hot_device_pauses_training_frees_the_trainer_and_resumes_without_losing_steps(fed, broker, coordinator):
    sensors = FakeSensors(temperature=50.0)
    coordinator.train = coordinator.train.__class__(**{**coordinator.train.to_dict(), "local_epochs": 20})
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    d = Running(fed, broker, sensors=sensors, gates={"max_temperature_c": 70.0, "temperature_hysteresis_c": 5.0},
                data=ALL_IMAGES)
    wait_for(lambda: d.state.steps > 0, what="training")
    sensors.temperature_c = 80.0
    wait_for(lambda: d.state.phase == "paused" and d.service.worker_pid is None, what="paused without a trainer")
    paused_at = d.state.steps
    assert status_of(broker)["gates"] == ["temperature 80.0 C"]
    sensors.temperature_c = 67.0  # within the hysteresis: still paused
    time.sleep(0.5)  # several gate readings (poll_s 0.2); nothing may start
    assert d.state.phase == "paused" and d.service.worker_pid is None and d.state.steps == paused_at
    sensors.temperature_c = 60.0
    got = wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="update after the pause")
    assert got.steps == 80 and not got.partial
    assert len(d.service.trainer_pids) == 2
    d.stop()


def test_unsigned_foreign_and_older_announcements_are_refused(fed, broker, coordinator):
    d = Running(fed, broker, sensors=FakeSensors(temperature=99.0), gates={"max_temperature_c": 70.0})
    weights = tiny_weights()
    coordinator.announce(round=5, deadline=T0 + 3600, weights=weights)
    wait_for(lambda: d.state.round is not None and d.state.round.round == 5, what="round 5")
    topic = Topics("fed").round
    stranger = CoordinatorKeys.generate()
    cases = {
        "malformed": b"not an announcement",
        "wrong_key": make_announcement(federation="fed", round=6, deadline=int(T0), quorum=1, train=coordinator.train,
                                       model=coordinator.model, tensors=weights, signing_key=stranger.signing),
        "wrong_federation": make_announcement(federation="other", round=6, deadline=int(T0), quorum=1,
                                              train=coordinator.train, model=coordinator.model, tensors=weights,
                                              signing_key=fed.coordinator.signing),
        "stale_round": make_announcement(federation="fed", round=4, deadline=int(T0), quorum=1,
                                         train=coordinator.train, model=coordinator.model, tensors=weights,
                                         signing_key=fed.coordinator.signing),
    }
    for reason, payload in cases.items():
        coordinator.client.publish(topic, payload, qos=1, retain=True).result(5)
        wait_for(lambda: d.service._message_error == f"round announcement refused: {reason}", what=reason)
        assert d.state.round.round == 5
    assert d.service.announcement.header.round == 5 and d.service.worker_pid is None
    d.stop()


def test_a_restart_publishes_the_stored_update_again_and_it_is_counted_once(fed, broker, coordinator):
    coordinator.receipts = False
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    d = Running(fed, broker)
    wait_for(lambda: d.state.phase == "submitted", what="update sent")
    wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="delivery")
    stored = d.service.folder.outbox.entries()
    assert len(stored) == 1
    d.stop()
    coordinator.receipts = True
    d2 = Running(fed, broker)
    wait_for(lambda: d2.state.phase == "idle" and d2.state.done_round == 1, what="receipt after the restart")
    # the state turns idle when the receipt is judged; the shell removes the outbox file just after
    wait_for(lambda: d2.service.folder.outbox.entries() == [], what="the outbox emptied by the receipt")
    assert [uid for _, uid in coordinator.deliveries] == [stored[0][1]] * 2
    assert len(coordinator.accepted) == 1 and d2.service.folder.outbox.entries() == []
    assert d2.service.trainer_pids == [], "a submitted round is not trained again"
    d2.stop()


def test_the_daemon_process_imports_no_pytorch():
    code = ("import sys; import fednca_daemon.cli, fednca_daemon.service, fednca_daemon.submission; "
            "import fednca.transport.mqtt; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_the_newest_verified_global_model_becomes_the_inference_model(fed, broker, coordinator, tmp_path):
    from fednca.data import save_folder
    from fednca.phantom import phantom_dataset
    from fednca.wire import model_sha256

    rng = np.random.default_rng(4)
    weights = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in tiny_weights().items()}
    coordinator.train = coordinator.train.__class__(**{**coordinator.train.to_dict(), "local_epochs": 1})
    coordinator.announce(round=1, deadline=T0 + 3600, weights=weights)
    d = Running(fed, broker, inference={"export": True})
    onnx = d.cfg.state_dir / "inference" / "model.onnx"
    sha = d.cfg.state_dir / "inference" / "model.sha256"
    wait_for(lambda: sha.exists(), timeout=120, what="the inference model's export")
    assert sha.read_text().strip() == model_sha256(weights) and onnx.stat().st_size > 1000
    assert d.stop() == 0

    save_folder(phantom_dataset(site=0, count=1, size=16), tmp_path / "img")
    image = next((tmp_path / "img" / "images").iterdir())
    env = {**os.environ, "FEDNCA_STATE_DIR": str(d.cfg.state_dir)}
    out = subprocess.run([sys.executable, "-m", "fednca_app.cli", "segment", str(image), "--out", str(tmp_path / "seg"),
                          "--passes", "2", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "seg" / f"{image.stem}_mask.png").exists()
