"""A site without PyTorch, as real processes: the daemon, its trainer child and its inference export
run with a ``torch`` package on their path whose import fails, against a real mosquitto and a
coordinator that verifies the update. The round's update is accepted and model.onnx is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from daemon_support import TINY_MODEL, FakeCoordinator, Federation, tiny_weights, wait_for
from fednca import modelfile
from fednca.config import train_preset
from fednca.segment import Segmenter
from fednca.transport.mqtt import MqttClient

BLOCKED = 'raise ImportError("PyTorch is not installed on this site (blocked by the test)")\n'
SITE_MODULES = ("fednca_app.cli", "fednca_daemon.cli", "fednca_daemon.service", "fednca_daemon.worker",
                "fednca.nptrain", "fednca.onnx_build", "fednca.segment")


def without_torch(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``import torch`` raises ImportError, in this process's children too."""
    blocked = tmp_path / "no-torch"
    (blocked / "torch").mkdir(parents=True)
    (blocked / "torch" / "__init__.py").write_text(BLOCKED)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join([str(blocked), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_the_sites_modules_import_without_torch(tmp_path):
    env = without_torch(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked by the test" in check.stderr  # the block works
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')\n"
    done = subprocess.run([sys.executable, "-c", code, *SITE_MODULES], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_fednca_export_without_torch_writes_the_same_graph_from_the_weights(tmp_path):
    modelfile.save(tmp_path / "model", tiny_weights(), TINY_MODEL)
    out = tmp_path / "model.onnx"
    done = subprocess.run([sys.executable, "-m", "fednca_app.cli", "export", str(tmp_path / "model"), "--out", str(out)],
                          env=without_torch(tmp_path), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "matches the numpy model" in done.stdout, done.stderr
    assert Segmenter.open(out).cfg == TINY_MODEL


@pytest.mark.slow
@pytest.mark.mosquitto
def test_a_site_without_torch_trains_submits_and_exports(tmp_path, mosquitto_factory):
    broker = mosquitto_factory(federation="fed", sites=("site-a",))
    fed = Federation(tmp_path)
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(fed.config_data(
        broker={"url": broker.url, "password": broker.passwords["site-a"]},
        training={"chunk_s": 0.5, "min_steps": 5, "deadline_margin_s": 0.0},  # trainer: numpy, the default
        inference={"export": True})))
    os.chmod(conf, 0o600)
    state = tmp_path / "site-a" / "state"
    client = MqttClient(url=broker.url, client_id="coordinator", username=broker.settings.coordinator_user,
                        password=broker.passwords[broker.settings.coordinator_user])
    assert client.connect(10)
    coordinator = FakeCoordinator(client=client, federation="fed", keys=fed.coordinator, registry=fed.registry,
                                  train=train_preset(batch_size=2, local_epochs=3))
    coordinator.start()
    weights = tiny_weights()
    coordinator.announce(round=1, deadline=2_000_000_000, weights=weights)
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fednca_app.cli", "daemon", "--config", str(conf)],
                                env=without_torch(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ("site-a", 1) in coordinator.accepted, timeout=120, what="the round's update")
        wait_for(lambda: (state / "inference" / "model.sha256").exists(), timeout=120, what="the inference export")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        coordinator.stop()
        client.disconnect()
    text = log.read_text()
    assert "Traceback" not in text, text
    got = coordinator.accepted[("site-a", 1)]
    assert coordinator.rejected == [] and not got.partial and got.steps == 3 * 3  # 3 epochs of 3 batches of 2
    assert max(float(np.abs(d).max()) for d in got.delta.values()) > 0  # it trained
    assert (state / "inference" / "model.sha256").read_text().strip() == coordinator.model_sha256
    assert "matches the numpy model" in (state / "inference" / "export.log").read_text()
    seg = Segmenter.open(state / "inference" / "model.onnx")
    assert seg.model_sha256 == coordinator.model_sha256
