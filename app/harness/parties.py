"""The parties of a federation, run in this process or as OS processes.

:class:`InProcessParties` runs the coordinator (``fednca_broker.coordinator.Coordinator``) and every
site (``fednca_daemon.service.Service``) on one in-memory broker, a thread each.
:class:`ProcessParties` runs mosquitto, ``python -m fednca_app.cli coordinator run`` and one
``... daemon --config`` per site, each in a process group of its own, and can kill, stop and
restart any of them. Both offer ``start()``, ``finished()``, ``telemetry()`` (the latest status
JSON of each site, read with the read-only ``fednca-monitor`` observer account, so that neither the
coordinator nor a ``fednca status`` beside it loses its session) and ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fednca.errors import FedNCAError
from fednca.topics import COORDINATOR, OBSERVER, SITE, Topics

from .folder import FederationFolder
from .processes import STOP_TIMEOUT, HarnessError, Mosquitto, Process, killpg, survivors

CLI = [sys.executable, "-m", "fednca_app.cli"]
# A daemon started here must not believe it runs under systemd because this process does.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


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


class InProcessParties:
    """The coordinator and every site on one in-memory broker, each party a thread of this process
    (each site still trains in a child process of its own, as its daemon does)."""

    def __init__(self, *, federation: FederationFolder, poll: float = 0.2) -> None:
        from fednca.transport.memory import MemoryBroker

        self.federation, self.poll = federation, poll
        self.cfg = federation.config()
        self.topics = Topics(self.cfg.federation.name)
        self.broker = MemoryBroker(federation=self.cfg.federation.name)
        self._coordinator_password = federation.password(self.cfg.broker.username)
        self.broker.add_user(self.cfg.broker.username, password=self._coordinator_password, role=COORDINATOR)
        for s in federation.sites:
            self.broker.add_user(s.name, password=federation.password(s.name), role=SITE)
        self._monitor_user = federation.monitor_user
        self.broker.add_user(self._monitor_user, password=federation.password(self._monitor_user), role=OBSERVER)
        self._threads: list[threading.Thread] = []
        self.services: dict[str, Any] = {}
        self.coordinator: Any = None
        self._monitor: Any = None
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
        for s in self.federation.sites:
            dcfg = dc.load(s.config)
            client = self.broker.client(
                client_id=f"site-{s.name}", username=s.name, password=dcfg.broker.password,
                will=Will(self.topics.status(s.name), b"offline", qos=1, retain=True))
            service = Service(config=dcfg, client=client, site_keys=k.read_site_keys(s.keys),
                              coordinator=k.read_coordinator_public(s.bundle))
            self.services[s.name] = service
            self._thread(service.run, s.name)
        self._monitor = self.broker.client(client_id=self._monitor_user, username=self._monitor_user,
                                           password=self.federation.password(self._monitor_user), clean_start=True)
        self._monitor.connect(5)
        self._monitor.subscribe(self.topics.all_status)

    def _thread(self, target: Any, name: str) -> None:
        def guarded() -> None:
            try:
                target()
            except BaseException as e:  # reported by finished(): a party must not die unseen
                self._errors.append(e)
                raise

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _run_coordinator(self) -> None:
        self.coordinator.start()
        while not self.coordinator.finished and not self.coordinator.stopped:
            self.coordinator.step(self.poll)

    def finished(self) -> bool:
        """True once the coordinator has run its last round; raises when a party failed."""
        if self._errors:
            raise HarnessError(f"a party failed: {self._errors[0]!r}")
        return bool(self.coordinator.finished)

    def telemetry(self) -> dict[str, dict]:
        """The latest status JSON of each site that has reported."""
        _collect_status(self._monitor, self.topics, self._latest)
        return dict(self._latest)

    def close(self) -> None:
        for service in self.services.values():
            service.request_stop()
        if self.coordinator is not None and not self.coordinator.finished:
            self.coordinator.stop()
        for t in self._threads:
            t.join(timeout=STOP_TIMEOUT)
        if self._monitor is not None:
            self._monitor.disconnect()


class ProcessParties:
    """mosquitto, the coordinator and each site as OS processes, logs in ``log_dir/NAME.log``.

    :meth:`start_broker` starts the federation's mosquitto; :meth:`start` the coordinator and every
    site. A party killed or stopped here may exit; any other exit is a failure that
    :meth:`failure` names (the coordinator may finish with status 0).
    """

    def __init__(self, *, federation: FederationFolder, log_dir: Path, poll: float = 0.2) -> None:
        self.federation, self.log_dir, self.poll = federation, log_dir, poll
        self.cfg = federation.config()
        self.topics = Topics(self.cfg.federation.name)
        self.parties: dict[str, Process] = {}
        self.mosquitto: Mosquitto | None = None
        self.groups: set[int] = set()  # every process group started, for the final check
        self._monitor: Any = None
        self._latest: dict[str, dict] = {}

    def _spawn(self, process: Process) -> None:
        process.start()
        self.groups.add(process.pid)
        self.parties[process.name] = process

    def start_broker(self, *, port: int | None = None) -> Mosquitto:
        """The federation's mosquitto, on its configured port or on ``port`` (see :meth:`Mosquitto.for_coordinator`)."""
        self.mosquitto = Mosquitto.for_coordinator(self.cfg, log_path=self.log_dir / "mosquitto.log", port=port)
        self.mosquitto.start()
        self.groups.add(self.mosquitto.process.pid)
        self.parties["mosquitto"] = self.mosquitto.process
        return self.mosquitto

    def start_coordinator(self, *, env: Mapping[str, str] | None = None, expect_exit: bool = False) -> None:
        """``fednca coordinator run``; ``env`` replaces the environment, ``expect_exit`` when it is to end itself."""
        argv = CLI + ["coordinator", "run", str(self.federation.folder), "--poll", str(self.poll)]
        self._spawn(Process(name="coordinator", argv=argv, log_path=self.log_dir / "coordinator.log",
                            env=dict(env) if env is not None else None))
        self.parties["coordinator"].expect_exit = expect_exit

    def start_site(self, site: str, *, wrapper: tuple[str, ...] = (), env: Mapping[str, str] | None = None) -> None:
        """``fednca daemon`` for ``site``; ``wrapper`` runs it under another program (such as
        ``faketime +2h``) and ``env`` adds to its environment."""
        merged = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV} | dict(env or {})
        argv = [*wrapper, *CLI, "daemon", "--config", str(self.federation.site(site).config)]
        self._spawn(Process(name=site, argv=argv, log_path=self.log_dir / f"{site}.log", env=merged))

    def start_program(self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None) -> None:
        """Another party (a misbehaving site, say) in a process group of its own, logged in
        ``log_dir/NAME.log``, stopped and checked by :meth:`close` like the others."""
        self._spawn(Process(name=name, argv=argv, log_path=self.log_dir / f"{name}.log",
                            env=dict(env) if env is not None else None))

    def start(self) -> None:
        """The coordinator and every site (mosquitto must be up: :meth:`start_broker`)."""
        self.start_coordinator()
        for s in self.federation.sites:
            self.start_site(s.name)

    def returncode(self, name: str) -> int | None:
        return self.parties[name].returncode()

    def kill(self, name: str) -> None:
        self.parties[name].kill()

    def stop(self, name: str) -> int:
        """SIGTERM and wait; the exit status."""
        try:
            return self.parties[name].stop()
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{name} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM{self.tails()}") from None

    def restart(self, name: str) -> None:
        """Start an exited party again with the same command (mosquitto: and wait until it listens)."""
        party = self.parties[name]
        assert not party.running(), f"{name} is still running"
        if name == "mosquitto" and self.mosquitto is not None:
            self.mosquitto.start()
        else:
            party.start()
        self.groups.add(party.pid)

    def failure(self) -> str | None:
        """The first party that exited without being told to, with its status and log's end."""
        for name, party in self.parties.items():
            code = party.returncode()
            if code is None or party.expect_exit or (name == "coordinator" and code == 0):
                continue
            return f"{name} exited with status {code}{self.tails(name)}"
        return None

    def finished(self) -> bool:
        """True once the coordinator has exited 0 (its last round run); raises when a party failed."""
        failed = self.failure()
        if failed is not None:
            raise HarnessError(failed)
        return self.returncode("coordinator") == 0

    def telemetry(self) -> dict[str, dict]:
        """The latest status JSON of each site that has reported (read through mosquitto)."""
        if self._monitor is None:
            from fednca_broker.clients import observer_client

            self._monitor = observer_client(self.cfg, self.federation.monitor_user)
            if not self._monitor.connect(10):
                raise HarnessError(f"cannot reach mosquitto at {self.cfg.broker.url}")
            self._monitor.subscribe(self.topics.all_status)
        _collect_status(self._monitor, self.topics, self._latest)
        return dict(self._latest)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, *names: str) -> str:
        shown = names or tuple(self.parties)
        return "".join(f"\n--- {n}.log (end) ---\n{self.log(n)[-2500:]}" for n in shown)

    def close(self) -> list[str]:
        """Stop every party gently (sites, coordinator, mosquitto), then SIGKILL each process group;
        the processes of those groups still alive after that (none, unless something escaped)."""
        if self._monitor is not None:
            self._monitor.disconnect()
        order = [*(s.name for s in self.federation.sites), "coordinator", "mosquitto"]
        order = [*(n for n in self.parties if n not in order), *order]  # other programs first
        try:
            for name in order:
                party = self.parties.get(name)
                if party is not None and party.running():
                    party.expect_exit = True
                    party.signal(signal.SIGTERM)
            for party in self.parties.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if party.popen is not None:
                        party.popen.wait(STOP_TIMEOUT)  # killed below if it will not exit
        finally:
            for group in self.groups:
                killpg(group)
            for party in self.parties.values():
                if party.popen is not None:
                    party.popen.wait(STOP_TIMEOUT)
        return survivors(self.groups)
