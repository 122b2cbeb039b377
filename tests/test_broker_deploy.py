"""A real mosquitto on the files ``fednca coordinator init`` writes, started the way Debian starts it.

As root, mosquitto drops to the ``mosquitto`` user before it reads the password and ACL files:
these tests start it as root from the generated conf (no ``user root``) and check that it runs,
as that user, and serves the federation; over TLS, that a client holding the enrolment bundle's CA
connects and one that does not trust it is refused. Skipped only where mosquitto or its user
cannot exist (no package, not root).
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fednca.keys import SiteKeys
from fednca.topics import Topics
from fednca.transport.mqtt import MqttClient, TLSOptions
from fednca_app.cli import main
from fednca_broker import tls
from fednca_broker.config import load_config
from mosquitto_fixture import MOSQUITTO, free_port

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None or shutil.which("mosquitto_passwd") is None, reason="mosquitto is not installed"),
]
WAIT = 10.0


def broker_user_exists() -> bool:
    return subprocess.run(["getent", "passwd", "mosquitto"], capture_output=True).returncode == 0


needs_broker_user = pytest.mark.skipif(
    os.geteuid() != 0 or not broker_user_exists(),
    reason="needs root and the mosquitto user (Debian's mosquitto package)")


@pytest.fixture
def open_dir():
    """A folder any user may enter (pytest's tmp_path is below a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="fednca-broker-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class Broker:
    """mosquitto in the foreground on a federation's conf, as its unit's ExecStart runs it."""

    def __init__(self, conf: Path, port: int) -> None:
        self.log = conf.parent.parent / "mosquitto.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        self.port = port
        deadline = time.monotonic() + WAIT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"mosquitto exited at start:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.02)

    def user(self) -> str:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        return pwd.getpwuid(uid).pw_name

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def init(folder: Path, broker_dir: Path, *args: str) -> None:
    assert main(["coordinator", "init", str(folder), "--federation", "fed", "--broker-dir", str(broker_dir),
                 *args]) == 0  # fmt: skip


def enroll(folder: Path, site: str, out: Path) -> str:
    assert main(["coordinator", "enroll", str(folder), site, bytes(SiteKeys.generate().verify_key).hex(),
                 "--out", str(out)]) == 0  # fmt: skip
    return (out / "mqtt-password").read_text().strip()


@needs_broker_user
def test_mosquitto_started_as_root_drops_to_its_user_and_reads_the_files(tmp_path, open_dir, capsys):
    port = free_port()
    fed = tmp_path / "fed"
    init(fed, open_dir / "broker", "--broker", f"mqtt://127.0.0.1:{port}")
    password = enroll(fed, "site-a", tmp_path / "bundle")
    cfg = load_config(fed / "coordinator.yaml")
    conf = cfg.mosquitto_settings().conf_path
    assert "user root" not in conf.read_text()
    broker = Broker(conf, port)
    try:
        assert broker.user() == "mosquitto"
        site = MqttClient(url=f"mqtt://127.0.0.1:{port}", client_id="site-a", username="site-a", password=password)
        assert site.connect(WAIT), site.last_error
        site.publish(Topics("fed").status("site-a"), b"{}", retain=True).result(WAIT)
        site.disconnect()
    finally:
        broker.stop()
    assert "Unable to open" not in broker.log.read_text()


def test_tls_end_to_end_the_bundle_ca_is_trusted_and_nothing_else(tmp_path, open_dir, capsys):
    port = free_port()
    fed = tmp_path / "fed"
    init(fed, open_dir / "broker", "--broker", f"mqtts://localhost:{port}", "--listen", f"127.0.0.1:{port}",
         "--tls-name", "localhost", "--tls-name", "127.0.0.1")
    password = enroll(fed, "site-a", tmp_path / "bundle")
    conf = load_config(fed / "coordinator.yaml").mosquitto_settings().conf_path
    broker = Broker(conf, port)
    try:
        url = f"mqtts://localhost:{port}"
        ca = TLSOptions(ca_file=str(tmp_path / "bundle" / "ca.crt"))
        site = MqttClient(url=url, client_id="site-a", username="site-a", password=password, tls=ca)
        assert site.connect(WAIT), site.last_error
        site.publish(Topics("fed").status("site-a"), b"{}", retain=True).result(WAIT)
        site.disconnect()
        by_ip = MqttClient(url=f"mqtts://127.0.0.1:{port}", client_id="site-a2", username="site-a",
                           password=password, tls=ca)  # the IP is in the certificate too
        assert by_ip.connect(WAIT), by_ip.last_error
        by_ip.disconnect()
        untrusting = MqttClient(url=url, client_id="x", username="site-a", password=password)
        try:
            assert untrusting.connect(1.0) is False  # the federation's CA is not among the system's
        finally:
            untrusting.disconnect()
        other_ca = tmp_path / "other-ca.pem"
        other_ca.write_bytes(tls.make_ca(federation="fed", now=dt.datetime.now(dt.timezone.utc)).cert_pem)
        stranger = MqttClient(url=url, client_id="y", username="site-a", password=password,
                              tls=TLSOptions(ca_file=str(other_ca)))
        try:
            assert stranger.connect(1.0) is False
        finally:
            stranger.disconnect()
        tls12 = ssl.create_default_context(cafile=str(tmp_path / "bundle" / "ca.crt"))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # what an older board's stack speaks
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with tls12.wrap_socket(raw, server_hostname="localhost") as wrapped:
                assert wrapped.version() == "TLSv1.2"
    finally:
        broker.stop()


def test_the_coordinator_tells_systemd_ready_watchdog_and_stopping(tmp_path, open_dir, capsys):
    """`coordinator run` as its Type=notify unit runs it: READY=1 once connected, WATCHDOG=1 from
    its loop at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM, exit status 0."""
    port = free_port()
    fed = tmp_path / "fed"
    init(fed, open_dir / "broker", "--broker", f"mqtt://127.0.0.1:{port}")
    broker = Broker(load_config(fed / "coordinator.yaml").mosquitto_settings().conf_path, port)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(WAIT)
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "NOTIFY_SOCKET")}
    env.update(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000")
    fednca = Path(sys.executable).with_name("fednca")
    process = subprocess.Popen([str(fednca), "coordinator", "run", str(fed), "--poll", "0.1"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        got: list[str] = []
        while got.count("WATCHDOG=1") < 2:
            got.append(notify.recv(4096).decode())  # times out (and fails) after WAIT seconds of silence
        assert got[0].startswith("READY=1")
        process.send_signal(signal.SIGTERM)
        while not got[-1].startswith("STOPPING=1"):
            got.append(notify.recv(4096).decode())
        assert process.wait(timeout=30) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
        broker.stop()
