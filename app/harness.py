"""The federation harness: a federation set up as an operator would, and run on one machine.

``fednca demo``, the end-to-end tests, the mosquitto test fixture and the coordinator benchmark
all need the same three things, and take them from here:

* :func:`set_up` makes a federation folder with the real commands (``fednca coordinator init``,
  ``enroll``), each site's signing keys and enrolment bundle, and one daemon YAML per site, with
  the model and training configuration given (the demo's, or a tiny one for tests);
* :class:`Mosquitto` runs mosquitto on 127.0.0.1 from files that ``fednca_broker.mosquitto``
  generated (:meth:`Mosquitto.for_coordinator` from a federation's configuration), and can stop,
  kill, restart and reload it;
* :class:`InProcessParties` runs the coordinator and every site daemon in this process on the
  in-memory broker (a thread each), :class:`ProcessParties` runs them as OS processes
  (``python -m fednca_app.cli coordinator run`` and ``... daemon --config``), each in a process
  group of its own, so that any one can be killed (with its trainer child), stopped, restarted.
  Both read the sites' latest telemetry with the coordinator's credentials.

Broker-side files are always made by ``fednca_broker``'s public functions, never rewritten here,
so what an operator's ``fednca coordinator init`` produces is what the harness runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from fednca.errors import FedNCAError
from fednca.topics import COORDINATOR, SITE, Topics

START_TIMEOUT = 10.0  # seconds for mosquitto to listen: a bound, not a measurement
STOP_TIMEOUT = 15.0  # seconds a party has to exit after SIGTERM before its group is killed
CLI = [sys.executable, "-m", "fednca_app.cli"]
# A daemon started here must not believe it runs under systemd because this process does.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class HarnessError(FedNCAError):
    """A federation could not be set up or one of its parties failed."""


def mosquitto_binary() -> str | None:
    """The mosquitto executable (on PATH or where Debian puts it), or None when not installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ setting up


@dataclass(frozen=True)
class SitePaths:
    name: str
    config: Path  # the daemon's YAML
    keys: Path  # its signing key folder
    bundle: Path  # what enrolment gave it: coordinator public keys, MQTT password

    @property
    def state_dir(self) -> Path:
        return self.config.parent / "state"


@dataclass(frozen=True)
class FederationFolder:
    """What :func:`set_up` made: the coordinator's folder and each site's files."""

    folder: Path
    sites: tuple[SitePaths, ...]

    def config(self) -> Any:
        """The coordinator's configuration (``fednca_broker.config.CoordinatorConfig``)."""
        from fednca_broker.config import CONFIG_NAME, load_config

        return load_config(self.folder / CONFIG_NAME)

    def site(self, name: str) -> SitePaths:
        return next(s for s in self.sites if s.name == name)

    def password(self, user: str) -> str:
        """The MQTT password of the coordinator's broker user or of a site."""
        cfg = self.config()
        if user == cfg.broker.username:
            return cfg.password_path.read_text().strip()
        return (self.site(user).bundle / "mqtt-password").read_text().strip()


def _quiet(argv: list[str]) -> str:
    from .cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if main(argv) != 0:
            raise HarnessError(f"'fednca {' '.join(argv[:2])}' failed")
    return out.getvalue()


def set_up(root: Path, *, federation: str, sites: int, rounds: int, quorum: int, url: str, model: Any,
           train: Any, grace: float, train_images: int, seed: int = 0, chunk_s: float = 2.0,
           telemetry_s: float = 2.0, site_urls: Mapping[str, str] | None = None) -> FederationFolder:
    """A federation folder under ``root`` (``coordinator/``, ``site0/``...) made as an operator would.

    ``model`` and ``train`` (``fednca.config`` objects) replace the preset's; rounds last up to 30
    minutes (extended by 10), closing ``grace`` s after the quorum. Site ``i`` trains on phantom
    site ``i`` (``train_images`` images, seeded by ``seed``, its trainer by ``seed + i``) with one
    thread, no gates and no ONNX export. ``site_urls`` gives a site another broker address (a
    relay); the others use ``url``, which the coordinator's configuration and broker files name.
    """
    from fednca_broker.config import to_yaml_dict

    from fednca import keys as k
    from fednca.atomic import write_text

    root = root.resolve()  # the daemons' YAML files name paths: make them absolute
    coordinator = root / "coordinator"
    _quiet(["coordinator", "init", str(coordinator), "--federation", federation, "--broker", url,
            "--quorum", str(quorum), "--max-rounds", str(rounds), "--seed", str(seed)])
    made = FederationFolder(folder=coordinator, sites=())
    cfg = made.config()
    fed = dataclasses.replace(
        cfg.federation, model=model, train=train,
        rounds=dataclasses.replace(cfg.federation.rounds, grace_s=grace, round_s=1800.0, extension_s=600.0),
    )
    cfg = dataclasses.replace(cfg, federation=fed)
    write_text(cfg.config_path, yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False), mode=0o640)
    paths = []
    for i in range(sites):
        name = f"site{i}"
        folder = root / name
        keys = k.SiteKeys.generate()
        k.write_site_keys(folder / "keys", keys)
        _quiet(["coordinator", "enroll", str(coordinator), name, bytes(keys.verify_key).hex(),
                "--out", str(folder / "bundle")])
        daemon = {
            "site": name, "federation": federation,
            "broker": {"url": (site_urls or {}).get(name, url), "password_file": str(folder / "bundle" / "mqtt-password")},
            "data": {"phantom": {"site": i, "count": train_images, "seed": seed}},
            "keys": {"site": str(folder / "keys"), "coordinator": str(folder / "bundle")},
            "state_dir": str(folder / "state"),
            "cpu": {"threads": 1, "duty_cycle": 1.0},
            "gates": {"max_temperature_c": None, "min_battery_percent": None},
            "training": {"chunk_s": chunk_s, "min_steps": 1, "deadline_margin_s": 5.0, "low_memory": False,
                         "seed": seed + i},
            "telemetry": {"interval_s": telemetry_s},
            "inference": {"export": False},  # whoever runs the harness evaluates the models itself
        }  # fmt: skip
        write_text(folder / "daemon.yaml", yaml.safe_dump(daemon, sort_keys=False), mode=0o600)
        paths.append(SitePaths(name=name, config=folder / "daemon.yaml", keys=folder / "keys",
                               bundle=folder / "bundle"))
    return FederationFolder(folder=coordinator, sites=tuple(paths))


# ------------------------------------------------------------------------------------- processes


@dataclass
class Process:
    """One program run in a process group of its own, its output appended to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    expect_exit: bool = False  # killed or stopped on purpose: its exit is no failure

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is still running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=log, env=self.env, start_new_session=True)
        self.expect_exit = False

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)  # type: ignore[union-attr]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; the exit status (``subprocess.TimeoutExpired`` if it does not exit)."""
        self.expect_exit = True
        self.signal(signal.SIGTERM)
        return self.popen.wait(timeout) if self.popen is not None else 0

    def kill(self) -> None:
        """SIGKILL to the whole process group (a daemon with its trainer): a power cut."""
        self.expect_exit = True
        if self.popen is not None:
            killpg(self.popen.pid)
            self.popen.wait(STOP_TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def killpg(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has exited


def survivors(groups: set[int]) -> list[str]:
    """Live (not zombie) processes in any of these process groups."""
    left = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.info['name']}")
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return left


class Mosquitto:
    """mosquitto on a 127.0.0.1 port, started from a configuration file that is already written."""

    def __init__(self, *, settings: Any, log_path: Path | None = None, binary: str | None = None) -> None:
        binary = binary or mosquitto_binary()
        if binary is None:
            raise HarnessError("mosquitto is not installed (apt-get install mosquitto)")
        self.settings = settings  # fednca_broker.mosquitto.MosquittoSettings
        self.process = Process(name="mosquitto", argv=[binary, "-c", str(settings.conf_path)],
                               log_path=log_path or Path(settings.folder) / "mosquitto.log")

    @classmethod
    def for_coordinator(cls, cfg: Any, *, log_path: Path | None = None) -> Mosquitto:
        """The mosquitto of a federation folder (its ``mosquitto/`` files, on its configured port).
        Run as root here, mosquitto is told to stay root (it would drop to a ``mosquitto`` user)."""
        from fednca_broker import mosquitto

        from fednca.atomic import write_text

        settings = cfg.mosquitto_settings()
        if os.geteuid() == 0:
            settings = dataclasses.replace(settings, run_as_root=True)
        write_text(settings.conf_path, mosquitto.render_conf(settings), mode=0o640)
        return cls(settings=settings, log_path=log_path)

    @property
    def port(self) -> int:
        return int(self.settings.port)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def start(self) -> None:
        if listening(self.port):
            raise HarnessError(f"port {self.port} is taken: pick another")
        self.process.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(self.port):
            if self.process.returncode() is not None:
                raise HarnessError(f"mosquitto exited at start; see {self.log_path}:\n{self.process.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise HarnessError(f"mosquitto did not listen within {START_TIMEOUT:.0f} s; see {self.log_path}")
            time.sleep(0.02)

    def stop(self) -> int | None:
        """SIGTERM: mosquitto saves its persistence file and exits (SIGKILL if it does not)."""
        if not self.process.running():
            return self.process.returncode()
        try:
            return self.process.stop(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.returncode()

    def kill(self) -> None:
        """SIGKILL: whatever was not yet saved is lost."""
        if self.process.running():
            self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto reads the password and ACL files again."""
        assert self.process.running(), "mosquitto is not running"
        self.process.signal(signal.SIGHUP)


# --------------------------------------------------------------------------------------- parties


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
        self._monitor = self.broker.client(client_id="monitor", username=cfg.broker.username,
                                           password=self._coordinator_password, clean_start=True)
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

    def start_broker(self) -> Mosquitto:
        self.mosquitto = Mosquitto.for_coordinator(self.cfg, log_path=self.log_dir / "mosquitto.log")
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

    def start_site(self, site: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        argv = CLI + ["daemon", "--config", str(self.federation.site(site).config)]
        self._spawn(Process(name=site, argv=argv, log_path=self.log_dir / f"{site}.log", env=env))

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
            from fednca_broker.cli import broker_client

            self._monitor = broker_client(self.cfg, client_id="fednca-harness-monitor", clean_start=True)
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
