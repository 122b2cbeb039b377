"""A federation of real processes on a real mosquitto, for the end-to-end and fault tests.

:class:`Federation` sets the federation up as ``fednca demo --broker`` does
(:func:`fednca_app.commands.demo.setup`: ``fednca coordinator init``/``enroll``, each site's keys,
bundle and daemon YAML), shrinks it to a tiny model, then runs mosquitto with the generated
configuration, password file and ACL, ``fednca coordinator run`` and one ``fednca daemon`` per
site, each in a process group of its own, and can kill, stop and restart any of them. A site may
reach the broker through a :class:`Relay` that can take its link down. :class:`Listener` records
what a broker user receives.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import yaml

from fednca_app.commands import demo
from fednca.transport.base import Message
from fednca.transport.mqtt import MqttClient
from fednca_broker import mosquitto
from fednca_broker.cli import KILL_ENV
from fednca_broker.config import CONFIG_NAME, load_config
from fednca_broker.store import RoundStore
from mosquitto_fixture import MOSQUITTO, free_port

FEDERATION = demo.FEDERATION
STOP_TIMEOUT = 15.0


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str,
               federation: "Federation | None" = None) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` s, naming ``what`` (a bound, not a
    measurement). With ``federation``, fail at once when one of its processes died unexpectedly."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if federation is not None:
            federation.check_alive()
        if time.monotonic() > deadline:
            tail = federation.tails() if federation is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.05)


class Relay:
    """A TCP relay between one site and mosquitto whose link can go down.

    ``cut()`` closes the connections it carries (the broker sees the site vanish and publishes its
    will) and holds the site's next connections without answering, keeping what the site sends;
    ``restore()`` connects them to the broker, delivering what was kept first, so the site's
    reconnect completes at once instead of after its back-off.
    """

    def __init__(self, *, broker_port: int) -> None:
        self.broker_port = broker_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._down = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.held = 0  # connections accepted while the link was down
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def cut(self) -> None:
        self._down.set()
        with self._lock:
            sockets, self._open = self._open, []
        for s in sockets:
            _shut(s)

    def restore(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                site, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(site,), name="relay-conn", daemon=True).start()

    def _serve(self, site: socket.socket) -> None:
        kept = bytearray()
        if self._down.is_set():
            self.held += 1
            site.settimeout(0.05)
            while self._down.is_set() and not self._closed.is_set():
                try:
                    data = site.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    site.close()
                    return
                kept += data
            if self._closed.is_set():
                site.close()
                return
            site.settimeout(None)
        try:
            broker = socket.create_connection(("127.0.0.1", self.broker_port), timeout=2.0)
            broker.settimeout(None)
            broker.sendall(kept)
        except OSError:
            site.close()  # the broker is down (restarting): the site retries
            return
        with self._lock:
            self._open += [site, broker]
        threading.Thread(target=_pump, args=(broker, site), name="relay-down", daemon=True).start()
        _pump(site, broker)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass  # either side closed: the other is shut below
    _shut(src)
    _shut(dst)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer
    s.close()


class Listener:
    """A broker client with a user's credentials that keeps every message it is sent (persistent
    session, so it also gets what was queued for it across a broker restart)."""

    def __init__(self, *, url: str, username: str, password: str, client_id: str, topics: list[str]) -> None:
        self.client = MqttClient(url=url, client_id=client_id, username=username, password=password)
        if not self.client.connect(10):
            raise AssertionError(f"{client_id}: cannot connect to {url} as {username}")
        for topic in topics:
            self.client.subscribe(topic, 1)
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"listen-{client_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.client.receive(0.1)
            if message is not None:
                self.client.ack(message)
                with self._lock:
                    self._messages.append(message)

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Party:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    expect_exit: bool = False  # killed or stopped on purpose: its exit is no failure


class Federation:
    """One federation folder and the processes that run it."""

    def __init__(self, *, root: Path, sites: int, rounds: int, quorum: int, grace: float,
                 relayed: tuple[str, ...] = ()) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed")
        self.root = root
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        args = argparse.Namespace(broker=self.url, quorum=quorum, rounds=rounds, seed=0, size=16, nca_steps=(3, 2),
                                  local_epochs=1, batch=2, grace=grace, sites=sites, train_images=8)
        self.folder, site_paths = demo.setup(args, root / "work")
        self.sites = [s.name for s in site_paths]
        self.site_paths = {s.name: s for s in site_paths}
        self.cfg = load_config(self.folder / CONFIG_NAME)
        self.store = RoundStore(root=self.cfg.store_root, federation=FEDERATION)
        self.logs = root / "logs"
        self.logs.mkdir()
        self.relays = {name: Relay(broker_port=self.port) for name in relayed}
        for name in self.sites:
            self._shrink(name)
        self.parties: dict[str, Party] = {}
        self._groups: set[int] = set()
        self._listeners: list[Listener] = []
        self._clients: list[MqttClient] = []

    def _shrink(self, site: str) -> None:
        """Short chunks and telemetry, no inference export; a relayed site connects to its relay."""
        path = self.site_paths[site].config
        data = yaml.safe_load(path.read_text())
        data["training"]["chunk_s"] = 0.2
        data["telemetry"]["interval_s"] = 1.0
        data["inference"] = {"export": False}
        if site in self.relays:
            data["broker"]["url"] = f"mqtt://127.0.0.1:{self.relays[site].port}"
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    # -- credentials and state --------------------------------------------------------------------

    def password(self, user: str) -> str:
        if user == self.cfg.broker.username:
            return self.cfg.password_path.read_text().strip()
        return (self.site_paths[user].bundle / "mqtt-password").read_text().strip()

    def listener(self, user: str, client_id: str, topics: list[str]) -> Listener:
        """A :class:`Listener` on these topics (below the federation's prefix); closed by :meth:`close`."""
        listener = Listener(url=self.url, username=user, password=self.password(user), client_id=client_id,
                            topics=[f"fednca/{FEDERATION}/{t}" for t in topics])
        self._clients.append(listener.client)
        self._listeners.append(listener)
        return listener

    def client(self, user: str, client_id: str) -> MqttClient:
        """A connected client with ``user``'s credentials; disconnected by :meth:`close`."""
        client = MqttClient(url=self.url, client_id=client_id, username=user, password=self.password(user))
        self._clients.append(client)
        if not client.connect(10):
            raise AssertionError(f"{client_id}: cannot connect to {self.url} as {user}")
        return client

    def state_dir(self, site: str) -> Path:
        return self.site_paths[site].config.parent / "state"

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.store.read_log() if kind is None or r.get("kind") == kind]

    def aggregated(self, round: int) -> bool:
        return any(r["round"] == round for r in self.records("round_aggregated"))

    def site_logged(self, site: str, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.log(site), re.MULTILINE)

    # -- processes --------------------------------------------------------------------------------

    def _spawn(self, party: Party) -> None:
        with open(self.logs / f"{party.name}.log", "ab") as log:
            party.process = subprocess.Popen(party.argv, stdout=log, stderr=log, env=party.env,
                                             start_new_session=True)  # its own process group
        party.expect_exit = False
        self._groups.add(party.process.pid)
        self.parties[party.name] = party

    def start_broker(self) -> None:
        settings = self.cfg.mosquitto_settings()
        if os.geteuid() == 0:  # mosquitto drops to its own user unless told to stay root
            settings = dataclasses.replace(settings, run_as_root=True)
        settings.conf_path.write_text(mosquitto.render_conf(settings))
        self._spawn(Party("mosquitto", [MOSQUITTO, "-c", str(settings.conf_path)], dict(os.environ)))
        wait_until(self._listening, timeout=10, what="mosquitto to listen", federation=self)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def start_coordinator(self, *, kill_after: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
        if kill_after:
            env[KILL_ENV] = kill_after
        argv = [sys.executable, "-m", "fednca_app.cli", "coordinator", "run", str(self.folder), "--poll", "0.2"]
        self._spawn(Party("coordinator", argv, env))
        self.parties["coordinator"].expect_exit = bool(kill_after)  # it kills itself

    def start_site(self, site: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        argv = [sys.executable, "-m", "fednca_app.cli", "daemon", "--config", str(self.site_paths[site].config)]
        self._spawn(Party(site, argv, env))

    def start(self, *, kill_coordinator_after: str | None = None) -> None:
        """The coordinator and every site (after :meth:`start_broker`)."""
        self.start_coordinator(kill_after=kill_coordinator_after)
        for site in self.sites:
            self.start_site(site)

    def returncode(self, name: str) -> int | None:
        process = self.parties[name].process
        assert process is not None
        return process.poll()

    def kill(self, name: str) -> None:
        """SIGKILL the party's whole process group (a daemon with its trainer): a power cut."""
        party = self.parties[name]
        assert party.process is not None
        party.expect_exit = True
        _killpg(party.process.pid)
        party.process.wait(STOP_TIMEOUT)

    def stop(self, name: str) -> int:
        """SIGTERM and wait; the exit status."""
        party = self.parties[name]
        assert party.process is not None
        party.expect_exit = True
        if party.process.poll() is None:
            party.process.send_signal(signal.SIGTERM)
        try:
            return party.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM{self.tails()}") from None

    def restart(self, name: str) -> None:
        party = self.parties[name]
        assert party.process is not None and party.process.poll() is not None, f"{name} is still running"
        self._spawn(party)
        if name == "mosquitto":
            wait_until(self._listening, timeout=10, what="mosquitto to listen again", federation=self)

    def check_alive(self) -> None:
        """Fail when a party exited that was not killed or stopped on purpose (the coordinator may
        finish with status 0)."""
        for name, party in self.parties.items():
            code = party.process.poll() if party.process is not None else None
            if code is None or party.expect_exit or (name == "coordinator" and code == 0):
                continue
            raise AssertionError(f"{name} exited with status {code}{self.tails(name)}")

    def tails(self, *names: str) -> str:
        shown = names or tuple(self.parties)
        return "".join(f"\n--- {n}.log (end) ---\n{self.log(n)[-2500:]}" for n in shown)

    def close(self) -> None:
        """Stop every process this federation started, gently, then by SIGKILL to each group; fail if
        any process of those groups is left alive."""
        for listener in self._listeners:
            listener.stop()
        for client in self._clients:
            client.disconnect()
        try:
            for name in [*self.sites, "coordinator", "mosquitto"]:
                party = self.parties.get(name)
                if party is not None and party.process is not None and party.process.poll() is None:
                    party.expect_exit = True
                    party.process.send_signal(signal.SIGTERM)
            for party in self.parties.values():
                try:
                    party.process.wait(STOP_TIMEOUT)  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    pass  # killed below
        finally:
            for relay in self.relays.values():
                relay.close()
            for group in self._groups:
                _killpg(group)
            for party in self.parties.values():
                party.process.wait(STOP_TIMEOUT)  # type: ignore[union-attr]
        left = survivors(self._groups)
        assert not left, f"processes left behind: {left}"


def _killpg(group: int) -> None:
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

