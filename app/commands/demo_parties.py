"""The parties of ``fednca demo``: one coordinator and N site daemons, in this process or as processes.

Both ways run the real pieces: ``fednca_broker.coordinator.Coordinator`` and
``fednca_daemon.service.Service`` (each site training in a child process of its own), with the
federation folder, keys, passwords and ACL that ``fednca coordinator init`` and ``enroll`` made.

* :class:`InProcess` puts everyone on one :class:`~fednca.transport.memory.MemoryBroker`, each
  party in a thread;
* :class:`Processes` starts mosquitto on the loopback port of ``--broker`` with the federation's
  generated configuration, then ``fednca coordinator run`` and one ``fednca daemon`` per site.

Each offers ``start()``, ``finished()``, ``telemetry()`` (the latest status JSON per site, read
with the coordinator's credentials) and ``stop()``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednca.errors import FedNCAError
from fednca.topics import COORDINATOR, SITE, Topics


@dataclass(frozen=True)
class SitePaths:
    name: str
    config: Path  # the daemon's YAML
    keys: Path  # its signing key folder
    bundle: Path  # what enrolment gave it: coordinator public keys, MQTT password


def _collect_status(client: Any, topics: Topics, latest: dict[str, dict]) -> None:
    while (msg := client.receive(timeout=0)) is not None:
        client.ack(msg)
        try:
            parsed = topics.parse(msg.topic)
            body = json.loads(msg.payload)
        except (FedNCAError, ValueError):
            continue
        if parsed.kind == "status" and parsed.site and isinstance(body, dict):
            latest[parsed.site] = body


class InProcess:
    def __init__(self, *, coordinator_dir: Path, sites: list[SitePaths]) -> None:
        from fednca_broker.config import CONFIG_NAME, load_config

        from fednca.transport.memory import MemoryBroker

        self.cfg = load_config(coordinator_dir / CONFIG_NAME)
        self.sites = sites
        self.topics = Topics(self.cfg.federation.name)
        self.broker = MemoryBroker(federation=self.cfg.federation.name)
        self._coordinator_password = self.cfg.password_path.read_text().strip()
        self.broker.add_user(self.cfg.broker.username, password=self._coordinator_password, role=COORDINATOR)
        for s in sites:
            self.broker.add_user(s.name, password=(s.bundle / "mqtt-password").read_text().strip(), role=SITE)
        self._threads: list[threading.Thread] = []
        self._services: list[Any] = []
        self.coordinator: Any = None
        self.monitor: Any = None
        self._latest: dict[str, dict] = {}
        self._errors: list[BaseException] = []

    def start(self) -> None:
        from fednca_broker.coordinator import Coordinator
        from fednca_broker.store import RoundStore
        from fednca_daemon import config as dc
        from fednca_daemon.service import Service

        from fednca import keys as k
        from fednca.transport.base import Will

        cfg = self.cfg
        self.coordinator = Coordinator(
            config=cfg.federation, store=RoundStore(root=cfg.store_root, federation=cfg.federation.name),
            keys=k.read_coordinator_keys(cfg.keys_dir), registry=k.read_registry(cfg.registry_path),
            client=self.broker.client(client_id="coordinator", username=cfg.broker.username,
                                      password=self._coordinator_password),
            clock=time.time,
        )
        self._thread(self._run_coordinator, "coordinator")
        for s in self.sites:
            dcfg = dc.load(s.config)
            client = self.broker.client(
                client_id=f"site-{s.name}", username=s.name, password=dcfg.broker.password,
                will=Will(self.topics.status(s.name), b"offline", qos=1, retain=True))
            service = Service(config=dcfg, client=client, site_keys=k.read_site_keys(s.keys),
                              coordinator=k.read_coordinator_public(s.bundle))
            self._services.append(service)
            self._thread(service.run, s.name)
        self.monitor = self.broker.client(client_id="monitor", username=cfg.broker.username,
                                          password=self._coordinator_password, clean_start=True)
        self.monitor.connect(5)
        self.monitor.subscribe(self.topics.all_status)

    def _thread(self, target: Any, name: str) -> None:
        def guarded() -> None:
            try:
                target()
            except BaseException as e:  # reported by finished(): a demo party must not die unseen
                self._errors.append(e)
                raise

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _run_coordinator(self) -> None:
        self.coordinator.start()
        while not self.coordinator.finished and not self.coordinator.stopped:
            self.coordinator.step(0.2)

    def finished(self) -> bool:
        if self._errors:
            raise FedNCAError(f"a demo party failed: {self._errors[0]!r}")
        return self.coordinator.finished

    def telemetry(self) -> dict[str, dict]:
        _collect_status(self.monitor, self.topics, self._latest)
        return dict(self._latest)

    def stop(self) -> None:
        for service in self._services:
            service.request_stop()
        if self.coordinator is not None and not self.coordinator.finished:
            self.coordinator.stop()
        for t in self._threads:
            t.join(timeout=15)
        if self.monitor is not None:
            self.monitor.disconnect()


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class Processes:
    """mosquitto, the coordinator and every site as separate OS processes."""

    def __init__(self, *, coordinator_dir: Path, sites: list[SitePaths], log_dir: Path) -> None:
        from fednca_broker.config import CONFIG_NAME, load_config

        self.coordinator_dir = coordinator_dir
        self.cfg = load_config(coordinator_dir / CONFIG_NAME)
        self.sites, self.log_dir = sites, log_dir
        self.topics = Topics(self.cfg.federation.name)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._latest: dict[str, dict] = {}
        self.monitor: Any = None

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)

    def start(self) -> None:
        from fednca_broker import mosquitto
        from fednca_broker.cli import broker_client

        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
        if binary is None:
            raise FedNCAError("--broker needs mosquitto installed (apt-get install mosquitto)")
        settings = self.cfg.mosquitto_settings()
        if not _free(settings.port):
            raise FedNCAError(f"port {settings.port} is taken: pick another --broker mqtt://127.0.0.1:PORT")
        if os.geteuid() == 0:  # mosquitto drops to its own user unless told to stay root
            import dataclasses

            settings = dataclasses.replace(settings, run_as_root=True)
        settings.conf_path.write_text(mosquitto.render_conf(settings))
        self._spawn("mosquitto", [binary, "-c", str(settings.conf_path)])
        deadline = time.monotonic() + 10
        while _free(settings.port):
            if time.monotonic() > deadline or self._procs["mosquitto"].poll() is not None:
                raise FedNCAError(f"mosquitto did not start; see {self.log_dir / 'mosquitto.log'}")
            time.sleep(0.05)
        py = [sys.executable, "-m", "fednca_app.cli"]
        self._spawn("coordinator", py + ["coordinator", "run", str(self.coordinator_dir), "--poll", "0.2"])
        for s in self.sites:
            self._spawn(s.name, py + ["daemon", "--config", str(s.config)])
        self.monitor = broker_client(self.cfg, client_id="fednca-demo-monitor", clean_start=True)
        if not self.monitor.connect(10):
            raise FedNCAError(f"cannot reach mosquitto at {self.cfg.broker.url}")
        self.monitor.subscribe(self.topics.all_status)

    def finished(self) -> bool:
        code = self._procs["coordinator"].poll()
        if code not in (None, 0):
            raise FedNCAError(f"the coordinator exited with status {code}; see {self.log_dir / 'coordinator.log'}")
        for s in self.sites:
            code = self._procs[s.name].poll()
            if code not in (None, 0):
                raise FedNCAError(f"site {s.name} exited with status {code}; see {self.log_dir / (s.name + '.log')}")
        return self._procs["coordinator"].poll() == 0

    def telemetry(self) -> dict[str, dict]:
        _collect_status(self.monitor, self.topics, self._latest)
        return dict(self._latest)

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.disconnect()
        order = [s.name for s in self.sites] + ["coordinator", "mosquitto"]
        for name in order:
            p = self._procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name in order:
            p = self._procs.get(name)
            if p is None:
                continue
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
