"""The daemon as real processes and real signals: SIGTERM with sd_notify on a real datagram socket,
and SIGKILL at many points of a round against a real mosquitto, resumed each time."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from daemon_support import FakeCoordinator, Federation, TINY_MODEL, tiny_weights, wait_for
from fednca.config import train_preset
from fednca.phantom import phantom_dataset
from fednca.nptrain import Trainer
from fednca.transport.mqtt import MqttClient
from fednca.wire import make_announcement
from fednca_daemon import config as dc
from fednca_daemon.submission import _metadata
from mosquitto_fixture import free_port

T_DEADLINE = 2_000_000_000
RUNNER = """
import os, signal, sys, logging
from pathlib import Path
from fednca_daemon.cli import run_daemon
point, _, count = sys.argv[2].partition(":")
seen = {"n": 0}
def probe(name):
    if name == point:
        seen["n"] += 1
        if seen["n"] == int(count or 1):
            print(f"KILL {name}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s")
sys.exit(run_daemon(Path(sys.argv[1]), probe=probe))
"""


def write_config(fed: Federation, path: Path, **sections) -> dc.DaemonConfig:
    path.write_text(yaml.safe_dump(fed.config_data(**sections)))
    os.chmod(path, 0o600)
    return dc.load(path, env={})


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(extra)
    return env


class Collector:
    """Receives sd_notify datagrams on a real unix socket, with the time each arrived."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        return [t for _, t in self.got]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.mark.slow
def test_sigterm_ends_the_chunk_checkpoints_and_exits_0_with_sd_notify(tmp_path):
    fed = Federation(tmp_path)
    conf = tmp_path / "daemon.yaml"
    cfg = write_config(fed, conf, broker={"url": f"mqtt://127.0.0.1:{free_port()}", "password": "x"},
                       training={"chunk_s": 10.0})  # a long chunk: the stop must cut it short
    train = train_preset(batch_size=2, local_epochs=1000)
    announcement = make_announcement(federation="fed", round=1, deadline=T_DEADLINE, quorum=1, train=train,
                                     model=TINY_MODEL, tensors=tiny_weights(), signing_key=fed.coordinator.signing)
    cfg.state_dir.mkdir(mode=0o700)
    (cfg.state_dir / "announcement.bin").write_bytes(announcement)  # the broker is down: train from the saved round
    notify = Collector(str(tmp_path / "notify"))
    proc = subprocess.Popen([sys.executable, "-m", "fednca_app.cli", "daemon", "--config", str(conf)],
                            env=daemon_env(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000"),
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "READY=1" in "".join(notify.texts()), what="READY=1")
        wait_for(lambda: (cfg.state_dir / "checkpoint.safetensors").exists(), what="the trainer's first checkpoint")
        wait_for(lambda: "WATCHDOG=1" in notify.texts(), what="a watchdog ping after the trainer's start-up")
        time.sleep(1.0)  # into the 10-second chunk
        pings_before = notify.texts().count("WATCHDOG=1")
        time.sleep(1.2)  # longer than the 0.5 s ping interval: a busy trainer stops the pings
        assert notify.texts().count("WATCHDOG=1") == pings_before
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps, "the daemon process must not hold PyTorch"
        trainers = psutil.Process(proc.pid).children()
        assert len(trainers) == 1
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        stop_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read()
        notify.close()
    assert rc == 0, stderr
    assert stop_s < 2.0, f"stopping took {stop_s:.2f} s"
    texts = notify.texts()
    assert any(t.startswith("READY=1\nSTATUS=") for t in texts) and "STOPPING=1" in texts
    assert any(t.startswith("STATUS=training round 1") for t in texts)
    meta = _metadata((cfg.state_dir / "checkpoint.safetensors").read_bytes())
    assert meta["extra"]["round"] == 1 and meta["steps"] > 0, "the interrupted chunk's steps are kept"
    assert not trainers[0].is_running() or trainers[0].status() == psutil.STATUS_ZOMBIE


# --------------------------------------------------------------------------------- SIGKILL points


def reference_delta(cfg: dc.DaemonConfig, weights, train, planned: int) -> dict[str, np.ndarray]:
    """The delta an uninterrupted run makes, computed here with the trainer directly."""
    data = phantom_dataset(site=0, count=8, size=TINY_MODEL.input_size, seed=0)
    t = Trainer(model_cfg=TINY_MODEL, train_cfg=train, data=data, seed=cfg.seed, low_memory=True,
                weights={k: np.array(v) for k, v in weights.items()})
    t.run(max_steps=planned)
    return {k: (v - weights[k]).astype(np.float16).astype(np.float32) for k, v in t.weights().items()}


def launch(conf: Path, probe: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", RUNNER, str(conf), probe], env=daemon_env(),
                                stderr=f, stdout=f)


@pytest.mark.slow
@pytest.mark.mosquitto
def test_sigkill_at_any_point_loses_no_update_and_at_most_one_chunk(tmp_path, mosquitto_factory):
    broker = mosquitto_factory(federation="fed", sites=("site-a",))
    fed = Federation(tmp_path)
    conf = tmp_path / "daemon.yaml"
    cfg = write_config(fed, conf, broker={"url": broker.url, "password": broker.passwords["site-a"]},
                       training={"chunk_s": 0.1, "min_steps": 5, "deadline_margin_s": 0.0},
                       data={"test_fraction": 0.0})  # all 8 images train, as in the reference run
    client = MqttClient(url=broker.url, client_id="coordinator", username=broker.settings.coordinator_user,
                        password=broker.passwords[broker.settings.coordinator_user])
    assert client.connect(10)
    train = train_preset(batch_size=2, local_epochs=40)
    coordinator = FakeCoordinator(client=client, federation="fed", keys=fed.coordinator, registry=fed.registry,
                                  train=train)
    coordinator.start()
    weights = tiny_weights()
    coordinator.announce(round=1, deadline=T_DEADLINE, weights=weights)
    planned = 160
    # Each launch is killed with SIGKILL at one point; the next one resumes from what is on disk.
    plan = ["chunk-started:3",      # mid-chunk: the chunk in flight is lost, nothing else
            "chunk-done:2",         # right after a chunk's checkpoint
            "update-stored:1",      # update written to the outbox, not yet published
            "update-delivered:1",   # published again and taken by the broker, receipt not yet handled
            "done-saved:1",         # receipt saved, update still in the outbox
            "none"]                 # runs to the end
    logs, resumed_at, last_step = [], [], []
    try:
        for i, point in enumerate(plan):
            log = tmp_path / f"launch-{i}.log"
            proc = launch(conf, point, log)
            if point == "none":
                wait_for(lambda: "outbox: update" in log.read_text(), what="the outbox emptied")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=20) == 0
            else:
                assert proc.wait(timeout=90) == -signal.SIGKILL, log.read_text()
            text = log.read_text()
            logs.append(text)
            assert f"KILL {point.split(':')[0]}" in text or point == "none", text
            for pid in re.findall(r"trainer (\d+) started", text):  # no orphan trainer outlives its daemon
                wait_for(lambda: not psutil.pid_exists(int(pid))
                         or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE, timeout=10, what="orphan gone")
            starts = re.findall(r"ready: round 1, step (\d+) of", text)
            steps = re.findall(r"chunk: \d+ steps in [\d.]+ s, step (\d+) of", text)
            resumed_at.append(int(starts[0]) if starts else None)
            last_step.append(int(steps[-1]) if steps else None)
    finally:
        coordinator.stop()
        client.disconnect()
    # launch 1 resumes exactly where launch 0's last finished chunk left off: only the chunk in flight was lost
    assert resumed_at[1] == last_step[0] and last_step[0] > 0
    assert resumed_at[2] == last_step[1]
    # launch 2 trained to the end; the later ones never trained again
    assert last_step[2] == planned and resumed_at[3:] == [None, None, None]
    stored = re.search(r"update ([0-9a-f]{8}) stored", logs[2]).group(1)
    got = coordinator.accepted[("site-a", 1)]
    assert len(coordinator.accepted) == 1 and got.update_id.startswith(stored)
    assert got.steps == planned and not got.partial
    assert {uid for _, uid in coordinator.deliveries} == {got.update_id} and len(coordinator.deliveries) >= 2
    assert coordinator.rejected == []
    expected = reference_delta(cfg, weights, train, planned)
    for k, d in got.delta.items():
        np.testing.assert_array_equal(d, expected[k])  # bit-identical to an uninterrupted run
    assert os.listdir(cfg.state_dir / "outbox") == []
    assert (cfg.state_dir / "done.json").exists()
